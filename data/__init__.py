"""Data plane: shards, manifests, sample plan, decoders, NaViT packing, loader."""
