"""The PEFT tuner: config, model (injection), registration of the method "TDLRT"."""
