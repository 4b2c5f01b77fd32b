"""The model and everything that updates it alone: the NanoGPT (`nanogpt`), MatFormer tiers and neuron
masks (`matformer`), `MaskedAdamW` and the LR schedule (`optim`), checkpoints (`checkpoint`), and one
client's forward/backward and validation (`train`). Imports only `data`, `config` and `errors`.
"""
