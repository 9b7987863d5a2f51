"""GLUEModule on a tiny random BERT: a training step, metrics, head seeding, vocab checks, and the CLI end to end."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from transformers import BertForMaskedLM, BertForSequenceClassification

from lightning_merge.cli import build_cli, main
from lightning_merge.data.glue import TASKS, GLUEDataModule, get_task
from lightning_merge.data.tokenizer import train_wordpiece
from lightning_merge.errors import CheckpointError, ConfigError
from lightning_merge.models import build_config, load_pretrained
from lightning_merge.modules.glue import METRICS, GLUEModule, build_classifier, predictions, task_metrics

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "glue").glob("*.yaml"))
WORDS = "the a film movie was is great dull fun boring plot actor it not very good bad and story premise"


def _tiny_mlm(vocab_size: int, seed: int) -> BertForMaskedLM:
    torch.manual_seed(seed)
    config = build_config("tiny", vocab_size, max_position_embeddings=128, hidden_size=32, intermediate_size=64)
    return BertForMaskedLM(config)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """Two pretraining 'seeds' of a tiny MLM, exported like our MLM runs (``hf/`` with model and tokenizer)."""
    root = tmp_path_factory.mktemp("mlm")
    texts = [" ".join(WORDS.split()[i:] + WORDS.split()[:i]) for i in range(20)]
    tokenizer = train_wordpiece(texts, vocab_size=150, min_frequency=1)
    dirs = {}
    for seed in (0, 1):
        dirs[f"seed{seed}"] = str(root / f"seed{seed}" / "hf")
        _tiny_mlm(len(tokenizer), seed).save_pretrained(dirs[f"seed{seed}"])
        tokenizer.save_pretrained(dirs[f"seed{seed}"])
    _tiny_mlm(50, 0).save_pretrained(root / "small_vocab")  # its vocab does not fit the tokenizer
    dirs["small_vocab"] = str(root / "small_vocab")
    return dirs


def _jsonl(path: Path, task: str, n: int, label=lambda i: i % 2) -> str:
    keys = get_task(task).text_keys
    rows = [{**{k: " ".join(WORDS.split()[i % 7 : i % 7 + 5]) for k in keys}, "label": label(i)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _data(tmp_path: Path, task: str, n: int = 8, **kwargs) -> GLUEDataModule:
    label = (lambda i: i / 2) if task == "stsb" else (lambda i: i % get_task(task).num_labels)
    files = {s: _jsonl(tmp_path / f"{s}.jsonl", task, n, label) for s in ("train", *get_task(task).validation_splits)}
    return GLUEDataModule(task=task, data_files=files, batch_size=4, **kwargs)


def test_metrics_for_every_task():
    for task in TASKS.values():
        assert set(task.metrics) <= set(METRICS)
        metrics = task_metrics(task)
        logits = torch.randn(6, task.num_labels)
        labels = torch.rand(6) * 5 if task.is_regression else torch.tensor([0, 1, 1, 0, 1, 0])
        metrics.update(predictions(logits, task), labels)
        assert set(metrics.compute()) == set(task.metrics), task.name


def test_head_seed_gives_identical_heads_across_pretraining_seeds(models):
    task = get_task("mnli")
    rng_before = torch.random.get_rng_state()
    a, b = (build_classifier(models[s], task, head_seed=0) for s in ("seed0", "seed1"))
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # dropout/shuffling unaffected
    assert a.classifier.out_features == 3 and a.config.id2label[2] == "contradiction"
    for name in ("classifier.weight", "classifier.bias", "bert.pooler.dense.weight"):  # MLM sources have no pooler
        assert torch.equal(a.state_dict()[name], b.state_dict()[name]), name
    assert not torch.equal(a.bert.embeddings.word_embeddings.weight, b.bert.embeddings.word_embeddings.weight)
    torch.manual_seed(1)
    c = build_classifier(models["seed0"], task, head_seed=None)
    torch.manual_seed(2)
    d = build_classifier(models["seed0"], task, head_seed=None)
    assert not torch.equal(c.classifier.weight, d.classifier.weight)


def test_the_attention_kernel_reaches_the_classifier(models):
    task = get_task("rt_polarity")
    assert build_classifier(models["seed0"], task).config._attn_implementation == "sdpa"
    module = GLUEModule(init_from=models["seed0"], task="rt_polarity", attn_implementation="eager")
    assert module.model.config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match="unknown attn_implementation 'fast'"):
        GLUEModule(init_from=models["seed0"], task="rt_polarity", attn_implementation="fast")


def test_training_step_metrics_and_checkpoint_round_trip(models, tmp_path, cpu_trainer_kwargs):
    # task and tokenizer come from the datamodule / init dir; no warmup: its first step has lr 0
    module = GLUEModule(init_from=models["seed0"], lr=1e-3, warmup_ratio=0.0)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0, **cpu_trainer_kwargs)
    trainer.fit(module, datamodule=_data(tmp_path, "mrpc"))
    before = load_pretrained(models["seed0"], BertForMaskedLM).bert.embeddings.word_embeddings.weight
    assert not torch.equal(module.model.bert.embeddings.word_embeddings.weight, before)
    metrics = trainer.callback_metrics
    assert {"train/loss", "val/loss", "val/accuracy", "val/f1", "val/majority_accuracy"} <= set(metrics)
    assert metrics["val/majority_accuracy"] == pytest.approx(0.5)
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    again = load_pretrained(tmp_path / "x.ckpt", BertForSequenceClassification)
    assert again.config.num_labels == 2 and torch.equal(again.classifier.weight, module.model.classifier.weight)
    assert GLUEModule.load_from_checkpoint(tmp_path / "x.ckpt").task.name == "mrpc"


@pytest.mark.parametrize(
    "task, expected",
    [
        ("stsb", {"val/loss", "val/pearson", "val/spearman"}),
        ("mnli", {"val/loss", "val/accuracy", "val_mismatched/loss", "val_mismatched/accuracy"}),
    ],
)
def test_regression_and_two_validation_splits(models, tmp_path, cpu_trainer_kwargs, task, expected):
    trainer = pl.Trainer(**cpu_trainer_kwargs)
    trainer.validate(GLUEModule(init_from=models["seed0"], task=task), datamodule=_data(tmp_path, task))
    assert expected <= set(trainer.callback_metrics)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


def test_vocab_mismatch_is_one_clear_error(models, tmp_path, cpu_trainer_kwargs):
    data = _data(tmp_path, "sst2", tokenizer=models["seed0"])
    with pytest.raises(
        CheckpointError, match=r"vocabulary of 50 tokens but tokenizer .* has \d+; fine-tune with the tokenizer"
    ):
        pl.Trainer(fast_dev_run=1, **cpu_trainer_kwargs).fit(GLUEModule(init_from=models["small_vocab"]), data)


def test_task_mismatch_between_model_and_data(models, tmp_path, cpu_trainer_kwargs):
    with pytest.raises(ConfigError, match="model.task=cola but data.task=sst2"):
        pl.Trainer(fast_dev_run=1, **cpu_trainer_kwargs).fit(
            GLUEModule(init_from=models["seed0"], task="cola"), _data(tmp_path, "sst2")
        )


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_glue_config_parses(config):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exit_info:
        build_cli(["--config", str(config), "--print_config"], run=False)
    assert exit_info.value.code == 0
    assert f"task: {config.stem}" in printed.getvalue()


def test_configs_cover_every_task():
    assert {p.stem for p in CONFIGS} == set(TASKS)


def test_cli_fit_rt_polarity_end_to_end(models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a recipe writes relative to the cwd stays out of the repo
    run = tmp_path / "run"
    args = [
        "--model.init_from",
        models["seed0"],
        "--trainer.default_root_dir",
        str(run),
        "--trainer.accelerator",
        "cpu",
    ]
    args += ["--data.max_train_samples", "32", "--data.max_eval_samples", "32", "--trainer.fast_dev_run", "1"]
    build_cli(["fit", "--config", str(CONFIGS[0].parent / "rt_polarity.yaml"), *args])
    model = BertForSequenceClassification.from_pretrained(run / "hf")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert (run / "hf" / "tokenizer.json").is_file()


def test_cli_bad_task_is_one_line(models, capsys):
    config = str(CONFIGS[0].parent / "rt_polarity.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--model.init_from", models["seed0"], "--data.task", "sst3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: unknown task 'sst3'; known tasks: cola, sst2")


@pytest.mark.slow
def test_minilm_encoder_and_pooler_load_into_a_classifier():
    from safetensors import safe_open

    from lightning_merge.data.offline import minilm_dir

    model = build_classifier(str(minilm_dir()), get_task("rt_polarity"))
    with safe_open(str(minilm_dir() / "model.safetensors"), "pt") as weights:  # a BertModel: no "bert." prefix
        assert torch.equal(model.bert.pooler.dense.weight, weights.get_tensor("pooler.dense.weight"))
        assert torch.equal(
            model.bert.encoder.layer[5].output.dense.weight, weights.get_tensor("encoder.layer.5.output.dense.weight")
        )


@pytest.mark.parametrize("family", ["roberta", "distilbert", "roberta-prelayernorm", "gpt2"])
def test_fine_tuning_starts_from_a_pretrained_model_of_every_family(family, tmp_path, cpu_trainer_kwargs):
    """The classifier class comes from the checkpoint's family (a GPT-2 causal LM becomes a
    ``GPT2ForSequenceClassification``); its pair inputs lose the token types the family does not take."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

    from lightning_merge.merge.families import CAUSAL_LM, get_family

    texts = [" ".join(WORDS.split()[i:] + WORDS.split()[:i]) for i in range(20)]
    tokenizer = train_wordpiece(texts, vocab_size=150, min_frequency=1)
    config = build_config("tiny", len(tokenizer), max_position_embeddings=128, family=family, hidden_size=32,
                          intermediate_size=64, pad_token_id=tokenizer.pad_token_id)
    lm_class = AutoModelForCausalLM if CAUSAL_LM in get_family(family).classes else AutoModelForMaskedLM
    lm_class.from_config(config).save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    module = GLUEModule(init_from=str(tmp_path / "hf"), lr=1e-3, warmup_ratio=0.0)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0, **cpu_trainer_kwargs)
    trainer.fit(module, datamodule=_data(tmp_path, "mrpc"))
    assert type(module.model).__name__ == get_family(family).classes["sequence_classification"]
    assert {"train/loss", "val/loss", "val/accuracy"} <= set(trainer.callback_metrics)
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    again = load_pretrained(tmp_path / "x.ckpt", AutoModelForSequenceClassification)
    assert type(again) is type(module.model)
