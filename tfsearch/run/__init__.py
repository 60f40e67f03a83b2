"""`tfsearch run`: the space, the plan, the training stage, the selection stage, the result tables."""
