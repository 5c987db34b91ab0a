"""AdaMix (Wang et al., 2022): M experts per insertion point, chosen by stochastic routing, merged by averaging.
Also the single-module LoRA and adapter baselines (one expert)."""
