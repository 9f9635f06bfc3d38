"""Local training loop (centralized baseline and each federated site) and its checkpoints.

    trainer.py          the loop (Trainer, train_local)
    checkpoint.py       a checkpoint written and read back, its hashes checked
    checkpoint_dirs.py  where checkpoints lie (step-NNNNNNNN) and the latest of them: no torch, so
                        what only looks for a checkpoint (a run's outcome, the coordinator's
                        dashboard) imports no torch

Import from the modules (`from healthfm_core.train.trainer import Trainer`): this package imports
none of them, so that importing checkpoint_dirs loads no torch.
"""
