"""ZOTrainer: zofast optimizers inside transformers.Trainer (tiny random models, CPU)."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers_models import make_tiny_model

from zofast.hf import TrainerOptimizer, ZOTrainer, ZOTrainingArguments, build_optimizer
from zofast.optim import LOZO, MeZO, param_groups
from zofast.replay import replay
from zofast.trajectory import Trajectory

STEPS = 4


class _Texts(torch.utils.data.Dataset):
    """A few tokenised sentences with labels for a causal LM or a classifier."""

    def __init__(self, tokenizer, causal: bool):
        texts = ["It was great.", "It was terrible.", "The sentiment is positive.", "Bad."] * 4
        enc = tokenizer(texts, padding="max_length", max_length=12, truncation=True)
        self.rows = []
        for i, ids in enumerate(enc["input_ids"]):
            mask = enc["attention_mask"][i]
            row = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
            if causal:
                row["labels"] = torch.tensor(
                    [t if m else -100 for t, m in zip(ids, mask, strict=True)]
                )
            else:
                row["labels"] = torch.tensor(i % 2)
            self.rows.append(row)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _gpt2(tmp_path):
    path = make_tiny_model("gpt2", tmp_path / "gpt2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    return model, _Texts(tokenizer, causal=True)


def _roberta_classifier(tmp_path):
    path = make_tiny_model("roberta", tmp_path / "roberta")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    return model, _Texts(tokenizer, causal=False)


def _args(tmp_path, cls=ZOTrainingArguments, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=3,
    )
    return cls(**{**defaults, **kwargs})


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("builder", "method"),
    [(_gpt2, "lozo"), (_gpt2, "mezo"), (_roberta_classifier, "lozo-m")],
)
def test_zo_trainer_steps_without_gradients(tmp_path, builder, method):
    model, ds = builder(tmp_path)
    before = _snapshot(model)
    trainer = ZOTrainer(model=model, args=_args(tmp_path, zo_method=method), train_dataset=ds)
    output = trainer.train()
    assert torch.isfinite(torch.tensor(output.training_loss))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert all(p.grad is None for p in model.parameters())
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "no weight changed"
    assert isinstance(trainer.optimizer.optimizer, TrainerOptimizer) or isinstance(
        trainer.optimizer, TrainerOptimizer
    )
    expected = {"lozo": "LOZO", "lozo-m": "LOZO", "mezo": "MeZO"}[method]
    assert trainer.trajectory.method == expected
    assert trainer.trajectory.steps == STEPS
    lrs = trainer.trajectory.lr[:, 0]
    assert lrs[0] > lrs[-1] > 0, "the linear LR schedule reaches the zofast optimizer"


def test_zo_trainer_trajectory_replays_bit_identically(tmp_path):
    model, ds = _gpt2(tmp_path)
    base = _snapshot(model)
    trainer = ZOTrainer(model=model, args=_args(tmp_path), train_dataset=ds)
    trainer.train()
    path = tmp_path / "trajectory.json"
    trainer.save_trajectory(path)
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2")
    assert all(torch.equal(p, base[n]) for n, p in fresh.named_parameters())
    replay(fresh, Trajectory.load(path))
    trained = dict(model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in fresh.named_parameters())


def test_zo_trainer_accepts_a_prebuilt_optimizer(tmp_path):
    model, ds = _gpt2(tmp_path)
    opt = MeZO(param_groups(model, 0.0), lr=1e-3, seed=11)
    args = _args(tmp_path, cls=transformers.TrainingArguments, max_steps=2)
    trainer = ZOTrainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))
    trainer.train()
    assert trainer.zo_optimizer is opt
    assert opt.trajectory.steps == 2 and opt.run_seed == 11
    assert all(p.grad is None for p in model.parameters())


def test_zo_trainer_refuses_torch_optimizers_and_accumulation(tmp_path):
    model, ds = _gpt2(tmp_path)
    adam = torch.optim.Adam(model.parameters())
    with pytest.raises(TypeError, match="LOZO or MeZO"):
        ZOTrainer(model=model, args=_args(tmp_path), train_dataset=ds, optimizers=(adam, None))
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        ZOTrainer(
            model=model, args=_args(tmp_path, gradient_accumulation_steps=2), train_dataset=ds
        )


def test_build_optimizer_reads_the_arguments(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    args = _args(tmp_path, zo_method="lozo-m", zo_rank=1, zo_nu=7, weight_decay=0.1)
    opt = build_optimizer(model, args)
    assert isinstance(opt, LOZO)
    assert "directions" not in opt.trajectory.hyperparameters
    assert build_optimizer(model, _args(tmp_path, zo_directions=3)).trajectory.directions == 3
    assert opt.trajectory.hyperparameters["rank"] == 1
    assert opt.trajectory.hyperparameters["nu"] == 7
    assert opt.trajectory.hyperparameters["momentum"] == 0.9
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    with pytest.raises(ValueError, match="zo_method"):
        build_optimizer(model, _args(tmp_path, zo_method="sgd"))
    view = TrainerOptimizer(opt)
    assert view.param_groups is opt.param_groups
    view.param_groups[0]["lr"] = 0.5
    assert opt.param_groups[0]["lr"] == 0.5
    assert view.step() is None and opt.steps == 0


def test_resume_from_checkpoint_continues_bit_for_bit(tmp_path):
    """Trainer's checkpoint holds the zofast state (JSON + safetensors, no optimizer.pt) and the
    trajectory; a run stopped at step 4 and resumed equals one that never stopped."""

    def run(out, resume=None, stop=None):
        model, ds = _gpt2(tmp_path)
        args = _args(
            tmp_path, output_dir=str(out), max_steps=8, save_strategy="steps", save_steps=4,
            zo_method="lozo-m",
        )  # fmt: skip
        trainer = ZOTrainer(model=model, args=args, train_dataset=ds)
        if stop is not None:

            class Stop(transformers.TrainerCallback):
                def on_step_end(self, args, state, control, **kwargs):
                    control.should_training_stop = state.global_step >= stop

            trainer.add_callback(Stop())
        trainer.train(resume_from_checkpoint=resume)
        return trainer, model

    whole, whole_model = run(tmp_path / "a")
    run(tmp_path / "b", stop=4)
    folder = tmp_path / "b" / "checkpoint-4"
    names = {p.name for p in folder.iterdir()}
    assert {"zofast_state.json", "zofast_state.safetensors", "trajectory.json"} <= names
    assert "optimizer.pt" not in names
    assert Trajectory.load(folder / "trajectory.json").steps == 4
    resumed, resumed_model = run(tmp_path / "b", resume=str(folder))
    assert resumed.trajectory == whole.trajectory and resumed.trajectory.steps == 8
    tuned = dict(resumed_model.named_parameters())
    assert all(torch.equal(p, tuned[n]) for n, p in whole_model.named_parameters())


def test_a_diverging_run_stops_and_keeps_its_trajectory(tmp_path):
    model, ds = _gpt2(tmp_path)
    trainer = ZOTrainer(
        model=model, args=_args(tmp_path, learning_rate=1e30, max_steps=8), train_dataset=ds
    )
    trainer.train()  # no exception
    assert trainer.diverged is not None and trainer.diverged.startswith("step ")
    step = int(trainer.diverged.split(":")[0].removeprefix("step "))
    assert trainer.state.global_step == step < 8, "training stopped at the refused step"
    assert trainer.trajectory.steps == step - 1 and trainer.trajectory.events[-1] != "step"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_saved_weights_are_settled(tmp_path):
    """bf16 MeZO writes its updates every 64 steps by default (accumulate): the model that
    ZOTrainer saves (and evaluates) holds every step's update, i.e. the optimizer settles."""
    model, ds = _gpt2(tmp_path)
    model = model.to(torch.bfloat16)
    trainer = ZOTrainer(model=model, args=_args(tmp_path, zo_method="mezo"), train_dataset=ds)
    start = _snapshot(model)
    trainer.train()
    assert trainer.zo_optimizer._accumulate == 64 and trainer.zo_optimizer.unflushed
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())  # none written
    trainer.save_model(str(tmp_path / "final"))
    assert not trainer.zo_optimizer.unflushed
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters())
