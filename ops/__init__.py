"""Fast paths (attention, MoE dispatch, fused losses), each beside its reference."""
