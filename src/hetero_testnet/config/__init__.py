"""Run configuration: frozen, validated dataclasses loaded from YAML or a Psyche `state.toml`.

The YAML layout mirrors Psyche's `state.toml` field for field (`config.*` timing and membership,
`model.LLM.*` for the model, data, LR schedule and optimizer) so a Psyche user can read it, plus
our own sections (`seed`, `model.LLM.architecture_config`, `validation`). A Psyche `state.toml`
loads unchanged: Psyche fields this tool does not implement, and in a `.toml` fields neither tool
knows, are named once in `RunConfig.notes` (config/psyche.py). Every invalid field, and every unknown
one in our own YAML, is a `ConfigError` naming its dotted path.

Relative data paths are resolved against the directory of the config file, so a config
directory can be moved together with its data.
"""

from hetero_testnet.config.load import (BUNDLED_CONFIGS_DIR, DEFAULT_CONFIG, DEFAULT_DATA_DIR, dump_yaml,
                                        find_config_file, load_run_config, parse_run_config, resolve_config_path)
from hetero_testnet.config.schema import (CONFIG_FILE_NAMES, DIRECTORY_NAME, OPTIMIZER_KINDS, DataConfig,
                                          LRScheduleConfig, ModelConfig, OptimizerConfig, RunConfig, RunTimingConfig)
from hetero_testnet.config.sync import SYNC_MODES, DemoSyncConfig, DiLoCoConfig, SyncConfig, shares_model

__all__ = ["BUNDLED_CONFIGS_DIR", "CONFIG_FILE_NAMES", "DEFAULT_CONFIG", "DEFAULT_DATA_DIR", "DIRECTORY_NAME",
           "OPTIMIZER_KINDS", "SYNC_MODES", "DataConfig", "DemoSyncConfig", "DiLoCoConfig", "LRScheduleConfig",
           "ModelConfig", "OptimizerConfig", "RunConfig", "RunTimingConfig", "SyncConfig", "dump_yaml",
           "find_config_file", "load_run_config", "parse_run_config", "resolve_config_path", "shares_model"]
