"""The methods: plain single-process PyTorch modules hooked onto a frozen base.

Shared by every family: hooks.py (attaching trainable modules from outside the base's module tree), targets.py
and decoder_layout.py (where they go), accounting.py (what is trained and served). One folder per family:
adamix/ (stochastic routing, stacked experts, merging) and routed/ (learned token routers: MoA, MoE-LoRA).
registry.py maps each kind of experts (config.METHODS) to its mixture class.
"""
