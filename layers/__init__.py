"""The model: tensor/sequence-parallel transformer layers with named activation buffers."""
