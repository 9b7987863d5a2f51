"""`LightningMergeCLI`: the LightningCLI behind ``lm-merge`` (fit / validate / test / predict / merge).

Imported only when a subcommand runs: Lightning and torch take seconds to import, and ``lm-merge --help`` should not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from pytorch_lightning.cli import LightningCLI

from lightning_merge.merge.methods import get_method
from lightning_merge.models import check_checkpoint
from lightning_merge.trainer import MergeTrainer


def fill_placeholders(value: Any, replacements: dict[str, str]) -> Any:
    """Replace each placeholder in every string of a (nested) config; Namespaces are updated in place."""
    if isinstance(value, str):
        for placeholder, text in replacements.items():
            value = value.replace(placeholder, text)
        return value
    if isinstance(value, list):
        return [fill_placeholders(v, replacements) for v in value]
    if isinstance(value, Namespace):
        for key in value.keys():
            value[key] = fill_placeholders(value[key], replacements)
    elif isinstance(value, dict):
        return {k: fill_placeholders(v, replacements) for k, v in value.items()}
    return value


class LightningMergeCLI(LightningCLI):
    """LightningCLI with a ``merge`` subcommand and two config placeholders.

    ``{seed}`` is replaced by ``seed_everything`` (``checkpoints/mlm/seed{seed}``), and ``{root}`` by the final
    ``trainer.default_root_dir``, so logger and checkpoint paths follow a run dir set on the command line.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "merge": {"model", "datamodule"}}

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            check_checkpoint(ckpt_path)  # LightningCLI reads its hyperparameters next: a damaged file fails here

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        seed = config.get("seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool):
            fill_placeholders(config, {"{seed}": str(seed)})
        root = config.get("trainer.default_root_dir")
        if root:
            fill_placeholders(config, {"{root}": str(root)})
        for name in config.get("methods") or []:
            get_method(name)  # an unknown method fails before any model is loaded


DESCRIPTION = (
    "lm-merge: pretrain BERT MLMs from seeds (fit), fine-tune them (fit with a GLUE config), merge two models and "
    "measure loss barriers (merge), or run the whole study from one YAML (reproduce; see `lm-merge reproduce --help`)."
)


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningMergeCLI:
    """Build (and by default run) the CLI; tests call this with ``args`` instead of going through a subprocess."""
    return LightningMergeCLI(
        trainer_class=MergeTrainer,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False, "description": DESCRIPTION},
        args=args,
        run=run,
    )
