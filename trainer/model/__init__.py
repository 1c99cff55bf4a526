"""The model: packed encoder, Perceiver resampler, HF causal LM, MoME layers."""
