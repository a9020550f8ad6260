"""The torch.fx graph passes, in pipeline order.

1. `tracing`       trace the model and record each node's shape
2. `blocks`        find the residual merges (layer gates) and channel points (channel gates)
3. `positions`     where inside a block a channel gate sits: one object per position
4. `graph_module`  `GatedModel`, the type the later steps accept, and its metadata
5. `insert`        `insert_gates`: put the gates into the traced graph
6. `surgery`       `materialize`: cut closed branches, channels and every gate out
   (`fold` folds what a fully closed gate leaves constant; `pruning` wraps torch-pruning)
"""
