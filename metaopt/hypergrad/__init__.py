"""Hand-designed hypergradient learning-rate optimizers (``../shared/specs/hypergradient.md`` is normative)."""
