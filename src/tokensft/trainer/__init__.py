"""The only package that imports trl: `TokenSFTConfig`, `TokenSFTTrainer`, the reference model and the train entry."""
