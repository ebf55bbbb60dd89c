"""Attribution methods: each builds a ModelScorer (query vectors + training contraction) for one model."""
