import pytest
import torch

from cpt_plugin.config import CPTConfig, CPTConfigError
from cpt_plugin.optim import build_param_groups, create_optimizer
from cpt_plugin.recipe import prepare_model
from tests.tiny import tiny_llama


def _model(tied=False):
    return prepare_model(tiny_llama(tied=tied), CPTConfig(lora_r=4))


def test_groups_and_learning_rates_after_a_step():
    model = _model(tied=False)
    optimizer = create_optimizer(model, CPTConfig(lora_r=4), learning_rate=1e-3, weight_decay=0.01)
    ids = torch.randint(0, 257, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    by_name = {g["cpt_group"]: g for g in optimizer.param_groups}
    assert by_name["lora"]["lr"] == pytest.approx(1e-3)
    assert by_name["embeddings"]["lr"] == pytest.approx(1e-4)
    embedding_ids = {
        id(model.get_input_embeddings().modules_to_save["default"].weight),
        id(model.get_output_embeddings().modules_to_save["default"].weight),
    }
    assert {id(p) for p in by_name["embeddings"]["params"]} == embedding_ids
    assert all(g["weight_decay"] == 0.0 for n, g in by_name.items() if n.endswith("no_decay"))
    assert by_name["lora"]["weight_decay"] == 0.01
    n_trainable = len({id(p) for p in model.parameters() if p.requires_grad})
    assert sum(len(g["params"]) for g in optimizer.param_groups) == n_trainable


def test_no_decay_on_norms_and_biases():
    model = tiny_llama(tied=False)
    for p in model.parameters():
        p.requires_grad_(True)
    groups = build_param_groups(model, CPTConfig(lora_r=4), 1e-3, weight_decay=0.1)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    for name, param in model.named_parameters():
        assert (id(param) in no_decay) == ("norm" in name), name


def test_tied_copy_counted_once_in_embedding_group():
    model = _model(tied=True)
    groups = build_param_groups(model, CPTConfig(lora_r=4), 1e-3)
    emb = [p for g in groups if g["cpt_group"].startswith("embeddings") for p in g["params"]]
    assert len(emb) == 1


def test_embeddings_change_at_the_expected_relative_rate():
    """With SGD the update is lr * grad: the embedding update must be 1/10 of what the main LR would give."""
    model = _model(tied=False)
    config = CPTConfig(lora_r=4, embedding_lr_ratio=0.1)
    groups = build_param_groups(model, config, learning_rate=1e-2)
    optimizer = torch.optim.SGD(groups, lr=1e-2)
    weight = model.get_input_embeddings().modules_to_save["default"].weight
    before = weight.detach().clone()
    ids = torch.randint(0, 257, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    grad = weight.grad.detach().clone()
    optimizer.step()
    torch.testing.assert_close(weight.detach() - before, -1e-3 * grad)
    assert (weight.detach() != before).any()


def test_adamw_8bit_with_bitsandbytes():
    pytest.importorskip("bitsandbytes")
    model = _model()
    optimizer = create_optimizer(model, CPTConfig(lora_r=4, optimizer="adamw_8bit"), learning_rate=1e-3)
    from cpt_plugin.optim_8bit import BatchedAdamW8bit

    assert isinstance(optimizer, BatchedAdamW8bit)  # bitsandbytes' update, one launch per group
    ids = torch.randint(0, 257, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert {g["cpt_group"] for g in optimizer.param_groups} >= {"lora", "embeddings"}


def test_no_trainable_parameters_is_a_clear_error():
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(CPTConfigError, match="prepare_model"):
        build_param_groups(model, CPTConfig(), 1e-3)


@pytest.mark.parametrize(
    ("settings", "embedding_update", "state_key"),
    [
        ({}, "adamw", "exp_avg"),  # the default: bf16 copies, stochastically rounded AdamW
        ({"embedding_optimizer": "adamw_8bit"}, "adamw_8bit", "state1"),
        ({"optimizer": "adamw_8bit"}, "adamw_8bit", "state1"),  # everything 8-bit, embeddings still rounded
    ],
)
def test_bf16_embeddings_get_their_update_in_one_optimizer(settings, embedding_update, state_key):
    pytest.importorskip("bitsandbytes")
    config = CPTConfig(lora_r=4, **settings)
    model = prepare_model(tiny_llama(tied=True, vocab_size=300).to(torch.bfloat16), config)
    optimizer = create_optimizer(model, config, learning_rate=1e-3)
    assert type(optimizer).__name__ == "CPTAdamW"
    ids = torch.randint(0, 300, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    groups = {g["cpt_group"]: g for g in optimizer.param_groups}
    embedding = groups["embeddings"]
    assert embedding["cpt_update"] == embedding_update and embedding["cpt_stochastic_rounding"]
    assert embedding["params"][0].dtype == torch.bfloat16
    assert state_key in optimizer.state[embedding["params"][0]]
    assert groups["lora"]["cpt_update"] == ("adamw_8bit" if "optimizer" in settings else "torch")


def test_embedding_optimizer_value_named():
    with pytest.raises(CPTConfigError, match="embedding_optimizer"):
        CPTConfig(embedding_optimizer="adam8")
