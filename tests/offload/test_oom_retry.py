"""An out-of-memory error in a micro-batch is recovered: the parameters end as in a run without it."""

from __future__ import annotations

import copy

import pytest
import torch
from offload_models import tiny_llama

from cpt_plugin.offload.oom_retry import run_with_oom_retry
from cpt_plugin.offload.planner import install_planner

ACCUMULATION = 2
STEPS = 3


class Failure:
    """Raises torch.OutOfMemoryError once, at (optimizer step, micro-batch), in layer ``layer``'s forward
    or in its backward (after the layers above have accumulated their gradients)."""

    def __init__(self, step: int, micro: int, layer: int, where: str) -> None:
        self.at, self.layer, self.where = (step, micro), layer, where
        self.now: tuple[int, int] | None = None
        self.fired = 0

    def _raise(self, *_args) -> None:
        self.fired += 1
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    def install(self, model: torch.nn.Module) -> None:
        def hook(_module, _inputs, output):
            if self.now != self.at or self.fired:
                return None
            if self.where == "forward":
                self._raise()
            hidden = output[0] if isinstance(output, tuple) else output
            hidden.register_hook(self._raise)  # fires in backward, once the layers above are done
            return None

        model.model.layers[self.layer].register_forward_hook(hook)


def _train(model: torch.nn.Module, batches, failure: Failure | None, *, planned: bool, dropout_seed: int = 0):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if planned:
        install_planner(model, _simulate_offload=True)
    if failure is not None:
        failure.install(model)
    losses = []
    torch.manual_seed(dropout_seed)
    for step in range(STEPS):
        for micro in range(ACCUMULATION):
            ids = batches[step * ACCUMULATION + micro]
            if failure is not None:
                failure.now = (step, micro)

            def training_step(ids=ids):
                loss = model(input_ids=ids, labels=ids).loss / ACCUMULATION
                loss.backward()
                return loss.detach()

            losses.append(run_with_oom_retry(training_step, model).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


@pytest.mark.parametrize(
    "step,micro,layer,where",
    [
        (0, 0, 1, "forward"),  # the very first forward: nothing accumulated yet
        (1, 1, 1, "backward"),  # micro-batch 2 of a window, midway through its backward
        (2, 0, 0, "backward"),  # layer 0: every layer's gradient already accumulated
        (1, 1, 2, "forward"),
    ],
)
def test_parameters_after_recovery_equal_a_run_without_failure(step, micro, layer, where) -> None:
    reference = tiny_llama(layers=3, attention_dropout=0.1)  # dropout: the retry must replay the RNG
    model = copy.deepcopy(reference)
    batches = [torch.randint(0, 257, (2, 17)) for _ in range(STEPS * ACCUMULATION)]
    ref_losses = _train(reference, batches, None, planned=False)
    failure = Failure(step, micro, layer, where)
    losses = _train(model, batches, failure, planned=True)
    assert failure.fired == 1
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for (name, a), (_, b) in zip(reference.named_parameters(), model.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
        assert b.requires_grad == a.requires_grad
    planner = model.__dict__["_cpt_memory_planner"]
    assert planner.oom_retries == 1 and planner.plan.counts()["keep"] < 3  # stepped down
    assert planner.pop_log()["memory_plan_oom_retries"] == 1


def test_without_a_planner_the_error_is_raised() -> None:
    model = tiny_llama(layers=2)

    def failing_step():
        raise torch.OutOfMemoryError("injected")

    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        run_with_oom_retry(failing_step, model)


def test_at_the_smallest_plan_the_error_says_what_to_do() -> None:
    model = tiny_llama(layers=2)
    install_planner(model, _simulate_offload=True)
    calls = []

    def failing_step():
        calls.append(1)
        raise torch.OutOfMemoryError("injected")

    with pytest.raises(torch.OutOfMemoryError, match="smallest memory plan.*Lower the tokens"):
        run_with_oom_retry(failing_step, model)
    assert 2 <= len(calls) <= 9
    assert all(p.requires_grad for p in model.parameters())
