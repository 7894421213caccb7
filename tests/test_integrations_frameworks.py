"""NeuroOptima inside the Hugging Face Trainer and accelerate, driven as their users drive them,
compared with the plain ``step(closure)`` loop on the same batches. Tiny models, CPU, nothing
downloaded; skipped where a framework is not installed."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

from neurooptima import NeuroOptima

HYPER = dict(lr=1e-2, weight_decay=0.01, sam_rho=0.05, lookahead_k=2)


class Net(nn.Module):
    """A model as Trainer expects one: keyword inputs, a dict with the loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.mse_loss(self.body(x).squeeze(-1), labels)}


def _samples(n: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=gen)
    y = x[:, 0] - 2 * x[:, 1] + 0.1 * torch.randn(n, generator=gen)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def _reference(model: nn.Module, samples: list[dict], batch: int, **hyper) -> None:
    """The plain loop: step(closure) on each batch of ``batch`` consecutive samples."""
    optimizer = NeuroOptima(model.parameters(), **hyper)
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        x = torch.stack([s["x"] for s in chunk])
        y = torch.stack([s["labels"] for s in chunk])

        def closure():
            optimizer.zero_grad()
            loss = model(x, y)["loss"]
            loss.backward()
            return loss
        optimizer.step(closure)


def _one_gradient_loop(model: nn.Module, samples: list[dict], hyper: dict) -> NeuroOptima:
    """backward() and step() (no closure) on batches of 4; returns the optimizer."""
    optimizer = NeuroOptima(model.parameters(), **hyper)
    for start in range(0, len(samples), 4):
        chunk = samples[start:start + 4]
        optimizer.zero_grad()
        model(torch.stack([s["x"] for s in chunk]),
              torch.stack([s["labels"] for s in chunk]))["loss"].backward()
        optimizer.step()
    return optimizer


def _max_error(a: nn.Module, b: nn.Module) -> float:
    return max(((p - q).abs().max() / q.abs().max()).item()
               for p, q in zip(a.parameters(), b.parameters()))


# ------------------------------------------------------------------------ Hugging Face Trainer

def _trainer(tmp_path, model, optimizer, samples, **args):
    transformers = pytest.importorskip("transformers")
    from neurooptima.integrations.transformers import SAMTrainer

    class InOrder(SAMTrainer):  # the test replays the batches in order
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    args = dict(dict(save_strategy="no"), **args)
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True,
        report_to=[], logging_strategy="no", disable_tqdm=True,
        lr_scheduler_type="constant", remove_unused_columns=False, **args)
    return InOrder(model=model, args=arguments, train_dataset=samples,
                   optimizers=(optimizer, None) if optimizer is not None else (None, None))


def test_trainer_sam_with_accumulation_equals_step_closure(tmp_path):
    """gradient_accumulation_steps=2: each optimizer step sees 2 micro-batches of 4 in both
    SAM passes, as step(closure) on the batch of 8; Trainer's clipping (max_grad_norm=1.0)
    acts on the update gradient as NeuroOptima's max_grad_norm does."""
    samples = _samples(24)
    model = Net()
    reference = copy.deepcopy(model)
    optimizer = NeuroOptima(model.parameters(), **HYPER)
    trainer = _trainer(tmp_path, model, optimizer, samples, gradient_accumulation_steps=2,
                       max_grad_norm=1.0, num_train_epochs=1)
    trainer.train()
    assert trainer.state.global_step == 3
    _reference(reference, samples, batch=8, max_grad_norm=1.0, **HYPER)
    assert _max_error(model, reference) < 1e-6
    assert _max_error(model, Net()) > 1e-3  # it trained


def test_trainer_without_sam_is_plain_trainer(tmp_path):
    samples = _samples(8)
    model = Net()
    reference = copy.deepcopy(model)
    hyper = dict(HYPER, sam_rho=0.0)
    trainer = _trainer(tmp_path, model, NeuroOptima(model.parameters(), **hyper), samples,
                       max_grad_norm=0.0, num_train_epochs=1)
    trainer.train()
    _reference(reference, samples, batch=4, **hyper)
    assert _max_error(model, reference) < 1e-6


def test_plain_trainer_runs_the_one_gradient_form(tmp_path):
    """sam_ascent="momentum" needs no adapter: plain Trainer (which calls the optimizer's
    train() every step) trains as a loop of backward() and step() does."""
    transformers = pytest.importorskip("transformers")
    samples = _samples(16)
    model = Net()
    reference = copy.deepcopy(model)
    hyper = dict(HYPER, sam_rho=1.0, sam_ascent="momentum")
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True, max_grad_norm=0.0,
        lr_scheduler_type="constant", remove_unused_columns=False, num_train_epochs=1)

    class InOrder(transformers.Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    InOrder(model=model, args=arguments, train_dataset=samples,
            optimizers=(NeuroOptima(model.parameters(), **hyper), None)).train()
    _one_gradient_loop(reference, samples, hyper)
    assert _max_error(model, reference) < 1e-6


def _saved_weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def test_sam_trainer_saves_momentum_ascent_at_w_and_resumes_exactly(tmp_path):
    """Plain Trainer saves whatever the model holds (the ascent point w~ under momentum
    ascent); SAMTrainer saves w, in checkpoints and in save_model(), and a checkpoint resumes
    the uninterrupted run."""
    samples = _samples(16)
    hyper = dict(HYPER, sam_rho=1.0, sam_ascent="momentum")
    model = Net()
    reference = copy.deepcopy(model)
    resumed_model = copy.deepcopy(model)
    optimizer = NeuroOptima(model.parameters(), **hyper)
    trainer = _trainer(tmp_path / "run", model, optimizer, samples, max_grad_norm=0.0,
                       num_train_epochs=1, save_strategy="steps", save_steps=2)
    trainer.train()
    # The plain loop, and its weights w at the end.
    plain = _one_gradient_loop(reference, samples, hyper)
    assert _max_error(model, reference) < 1e-6  # the model holds w~ while training
    plain.eval()
    at_w = {f"body.{k}": v for k, v in reference.body.state_dict().items()}
    # w~ and w differ here, so the checks below can fail.
    assert (model.body[0].weight - reference.body[0].weight).abs().max().item() > 1e-4
    for folder in (tmp_path / "run" / "checkpoint-4", tmp_path / "final"):
        if folder.name == "final":
            trainer.save_model(str(folder))
        saved = _saved_weights(folder)
        assert max((saved[k] - v).abs().max().item() for k, v in at_w.items()) < 1e-6, folder
    # Saving left the model (at w~) and the optimizer (training mode) where training had them.
    assert not optimizer.param_groups[0]["ascent_eval"]
    plain.train()
    assert _max_error(model, reference) < 1e-6
    # Resume from the step-2 checkpoint: the same end as the uninterrupted run.
    again = _trainer(tmp_path / "run", resumed_model,
                     NeuroOptima(resumed_model.parameters(), **hyper), samples,
                     max_grad_norm=0.0, num_train_epochs=1, save_strategy="no")
    again.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert _max_error(resumed_model, model) < 1e-6


def test_trainer_optimizer_cls_and_kwargs_takes_weight_decay_from_args(tmp_path):
    """Trainer's own convention, stated in docs/integrations.md: its two param groups get
    args.weight_decay (default 0.0) and 0.0, whatever the kwargs say; lr comes from kwargs."""
    transformers = pytest.importorskip("transformers")
    from neurooptima.integrations.transformers import SAMTrainer

    arguments = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                               report_to=[], weight_decay=0.05)
    trainer = SAMTrainer(model=Net(), args=arguments, train_dataset=_samples(4),
                         optimizer_cls_and_kwargs=(NeuroOptima, dict(lr=1e-3,
                                                                      weight_decay=0.01)))
    optimizer = trainer.create_optimizer()
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 0.05]
    assert {g["lr"] for g in optimizer.param_groups} == {1e-3}


@pytest.mark.parametrize("setting, words", [
    (dict(is_deepspeed_enabled=True), "DeepSpeed engine steps the optimizer"),
    (dict(is_fsdp_enabled=True), "FSDP"),
    (dict(scaler=object()), "fp16=True"),
    (dict(n_gpu=2), "DataParallel"),
])
def test_trainer_combinations_that_cannot_be_exact_are_refused(setting, words):
    pytest.importorskip("transformers")
    from neurooptima.integrations.transformers import SAMTrainerError, _check_exact

    trainer = types.SimpleNamespace(
        args=types.SimpleNamespace(n_gpu=setting.get("n_gpu", 1)),
        accelerator=types.SimpleNamespace(scaler=setting.get("scaler")),
        is_deepspeed_enabled=setting.get("is_deepspeed_enabled", False),
        is_fsdp_enabled=setting.get("is_fsdp_enabled", False))
    with pytest.raises(SAMTrainerError, match=words) as info:
        _check_exact(trainer)
    assert "sam_ascent='momentum'" in str(info.value)


# --------------------------------------------------------------------------------- accelerate

@pytest.fixture
def accelerate():
    accelerate = pytest.importorskip("accelerate")
    yield accelerate
    # One Accelerator per test: its process-wide state is reset for the next one.
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    accelerate.state.GradientState._reset_state()


def _micro_batches(samples: list[dict], size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.stack([s["x"] for s in samples[i:i + size]]),
             torch.stack([s["labels"] for s in samples[i:i + size]]))
            for i in range(0, len(samples), size)]


def _loss(model, batch):
    return model(*batch)["loss"]


@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "grad-scaler"])
def test_accelerate_sam_step_with_accumulation_equals_step_closure(accelerate, scaled):
    """gradient_accumulation_steps=4: sam_step runs both passes over the 4 micro-batches of a
    step, as step(closure) on the batch of 16 does; with a GradScaler (what fp16 brings) the
    scale leaves the update unchanged."""
    from neurooptima.integrations.accelerate import sam_step

    samples = _samples(48)
    model = Net()
    reference = copy.deepcopy(model)
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=4, cpu=True)
    if scaled:
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model, optimizer = accelerator.prepare(model, NeuroOptima(model.parameters(), **HYPER))
    assert (optimizer.scaler is not None) == scaled
    micro = _micro_batches(samples, 4)
    losses = [sam_step(accelerator, optimizer, model, micro[i:i + 4], _loss)
              for i in range(0, len(micro), 4)]
    _reference(reference, samples, batch=16, **HYPER)
    assert _max_error(model, reference) < 1e-6
    assert all(torch.isfinite(loss) for loss in losses)


def test_accelerate_accumulate_with_step_closure_is_refused(accelerate):
    """The loop accelerate's docs suggest, with SAM's closure: accelerate would drop the step,
    and with it the closure, on 3 of 4 micro-batches. The optimizer refuses the step."""
    model = Net()
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=4, cpu=True)
    model, optimizer = accelerator.prepare(model, NeuroOptima(model.parameters(), **HYPER))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="gradient_accumulation_steps=4.*sam_step"):
        for batch in _micro_batches(_samples(16), 4):
            with accelerator.accumulate(model):
                def closure():
                    optimizer.zero_grad()
                    loss = _loss(model, batch)
                    accelerator.backward(loss)
                    return loss
                optimizer.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_accelerate_fp16_scaler_with_step_closure_is_refused(accelerate):
    """accelerate hands the closure to GradScaler.step, which unscales before SAM's passes:
    the second pass would reach the update scaled. Refused before anything changes."""
    model = Net()
    accelerator = accelerate.Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu")  # what mixed_precision="fp16" brings
    model, optimizer = accelerator.prepare(model, NeuroOptima(model.parameters(), **HYPER))
    # A later step of a loop that zeroes gradients in place (zero_grad(set_to_none=False)):
    # the scaler has scaled a loss and finds gradients to unscale before calling step.
    accelerator.scaler.scale(torch.ones(()))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    batch = _micro_batches(_samples(4), 4)[0]

    def closure():
        optimizer.zero_grad()
        loss = _loss(model, batch)
        accelerator.backward(loss)
        return loss
    with pytest.raises(RuntimeError, match="GradScaler.step.*sam_step"):
        optimizer.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_accelerate_prepared_optimizer_reaches_the_phases(accelerate):
    from neurooptima.integrations import unwrap_optimizer

    model = Net()
    accelerator = accelerate.Accelerator(cpu=True)
    inner = NeuroOptima(model.parameters(), **HYPER)
    model, optimizer = accelerator.prepare(model, inner)
    assert unwrap_optimizer(optimizer) is inner is optimizer.optimizer
