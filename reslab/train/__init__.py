"""Training: config, the loop, schedules, checkpoints, DDP helpers, run-directory logging.

Typical use::

    from reslab.train import load_config, train
    cfg = load_config("configs/he2015_resnet20_c10.yaml", ["train.epochs=1"])
    result = train(cfg, "runs/r20")
"""
from reslab.train.config import (DataConfig, EvalConfig, ModelConfig, OptimConfig, RunConfig, ScheduleConfig,
                                 TrainConfig, apply_overrides, config_from_dict, config_to_dict, dump_config,
                                 load_config, valid_keys)
from reslab.train.engine import (EMA, Callback, TrainingDiverged, TrainResult, build_model, param_groups,
                                 prepare_data, resume_config, train)
# ``reslab.train.evaluate`` is the module (eval_dataset, evaluate_checkpoint, ...); the function
# that evaluates a model on a data set is ``reslab.train.engine.evaluate``.
from reslab.train.evaluate import eval_dataset, evaluate_checkpoint, load_model_from_checkpoint
from reslab.train.schedule import LRSchedule, lr_curve

__all__ = ["Callback", "DataConfig", "EMA", "EvalConfig", "LRSchedule", "ModelConfig", "OptimConfig", "RunConfig",
           "ScheduleConfig", "TrainConfig", "TrainResult", "TrainingDiverged", "apply_overrides", "build_model",
           "config_from_dict", "config_to_dict", "dump_config", "eval_dataset", "evaluate_checkpoint",
           "load_config", "load_model_from_checkpoint", "lr_curve", "param_groups", "prepare_data",
           "resume_config", "train", "valid_keys"]
