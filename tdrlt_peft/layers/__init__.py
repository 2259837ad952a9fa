"""Adapter and factorized layers: fixed-size storage, forward/backward that deliver the TDLRT gradients."""
