import math

import pytest
import torch

from llmbook.train import History, train


def mse(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def test_one_sgd_step_equals_the_closed_form():
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    train(model, [(x, y)], mse, steps=1, optimizer=opt, max_grad_norm=None, progress=False)
    # d/dw mean((xw + b - y)^2) = 2/N x^T (xw + b - y)
    residual = x @ w0.T + b0 - y
    torch.testing.assert_close(model.weight.detach(), w0 - lr * 2 * residual.T @ x / len(x))
    torch.testing.assert_close(model.bias.detach(), b0 - lr * 2 * residual.mean(0))


def test_gradient_accumulation_equals_the_full_batch():
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    a, b = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    b.load_state_dict(a.state_dict())
    train(a, [(x[:4], y[:4]), (x[4:], y[4:])], mse, steps=1, grad_accum_steps=2,
          optimizer=torch.optim.SGD(a.parameters(), lr=0.1), max_grad_norm=None, progress=False)
    mse(b, (x, y)).backward()
    with torch.no_grad():
        for p in b.parameters():
            p -= 0.1 * p.grad
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_clipping_limits_the_update_norm():
    model = torch.nn.Linear(4, 1, bias=False)
    x, y = torch.randn(16, 4) * 100, torch.randn(16, 1) * 100  # a huge gradient
    w0 = model.weight.detach().clone()
    hist = train(model, [(x, y)], mse, steps=1, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                 max_grad_norm=0.5, progress=False)
    assert hist["grad_norm"][0] > 0.5  # the norm before clipping is what is logged
    torch.testing.assert_close((model.weight - w0).norm(), torch.tensor(0.5))


def test_converges_to_least_squares():
    torch.manual_seed(1)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([[1.5], [-2.0], [0.5]]) + 0.1 * torch.randn(64, 1)
    model = torch.nn.Linear(3, 1, bias=False)
    hist = train(model, [(x, y)], mse, steps=300, lr=0.05, progress=False)
    solution = torch.linalg.lstsq(x, y).solution
    torch.testing.assert_close(model.weight.detach().T, solution, atol=1e-3, rtol=1e-3)
    assert hist["loss"][-1] < hist["loss"][0]
    assert hist["step"] == list(range(1, 301))
    assert all(len(column) == 300 for column in hist.values())


def test_metrics_from_loss_fn_are_logged_and_warmup_ramps_lr():
    model = torch.nn.Linear(2, 1)

    def loss_fn(model, batch):
        loss = model(batch).pow(2).mean()
        return loss, {"twice": 2 * loss}

    hist = train(model, [torch.randn(4, 2)], loss_fn, steps=4, lr=1.0, warmup_steps=4,
                 optimizer=torch.optim.SGD(model.parameters(), lr=1.0), progress=False)
    assert hist["lr"] == [0.25, 0.5, 0.75, 1.0]
    for loss, twice in zip(hist["loss"], hist["twice"]):
        assert math.isclose(twice, 2 * loss, rel_tol=1e-6)


def test_nan_loss_stops_training_and_names_the_step():
    model = torch.nn.Linear(2, 1)
    batches = [torch.ones(1, 2), torch.full((1, 2), float("nan"))]
    with pytest.raises(FloatingPointError, match="step 2"):
        train(model, batches, lambda m, b: m(b).sum(), steps=3, progress=False)


def test_train_restores_eval_mode():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).eval()
    train(model, [torch.randn(2, 2)], lambda m, b: m(b).sum(), steps=1, progress=False)
    assert not model.training


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps"),
    ({"steps": 1, "grad_accum_steps": 0}, "grad_accum_steps"),
    ({"steps": 1, "lr": 0.0}, "lr"),
    ({"steps": 1, "warmup_steps": -1}, "warmup_steps"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train(torch.nn.Linear(2, 1), [torch.randn(1, 2)], lambda m, b: m(b).sum(), progress=False, **kwargs)


def test_frozen_model_and_empty_data_are_rejected():
    frozen = torch.nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(frozen, [torch.randn(1, 2)], lambda m, b: m(b).sum(), steps=1, progress=False)
    with pytest.raises(ValueError, match="batches is empty"):
        train(torch.nn.Linear(2, 1), [], lambda m, b: m(b).sum(), steps=1, progress=False)


def test_non_scalar_loss_is_rejected():
    with pytest.raises(ValueError, match="scalar"):
        train(torch.nn.Linear(2, 1), [torch.randn(3, 2)], lambda m, b: m(b), steps=1, progress=False)


def test_history_keeps_columns_aligned():
    h = History()
    h.log(step=1, loss=1.0)
    h.log(step=2, loss=0.5, extra=3.0)
    h.log(step=3, loss=0.25)
    assert math.isnan(h["extra"][0]) and h["extra"][1] == 3.0 and math.isnan(h["extra"][2])
    assert h.last() == 0.25 and h.mean(last=2) == 0.375


def test_the_progress_bar_goes_to_stderr_and_can_be_switched_off(capsys):
    model = torch.nn.Linear(3, 1)
    batches = [{"x": torch.ones(2, 3)}]
    loss_fn = lambda m, b: m(b["x"]).pow(2).mean()  # noqa: E731
    train(model, batches, loss_fn, steps=3, lr=0.1, progress=True)
    shown = capsys.readouterr()
    assert shown.out == "" and "train" in shown.err and "3/3" in shown.err
    train(model, batches, loss_fn, steps=3, lr=0.1, progress=False)
    assert capsys.readouterr().err == ""


def test_callback_sees_each_step_and_can_stop_training():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    seen = []

    def callback(step, metrics):
        seen.append((step, metrics["loss"]))
        return step == 4

    history = train(model, [(x, y)], lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), steps=10, lr=0.1,
                    callback=callback, progress=False)
    assert [s for s, _ in seen] == [1, 2, 3, 4] and history["step"] == [1, 2, 3, 4]
    assert [loss for _, loss in seen] == history["loss"]
    with pytest.raises(TypeError, match="callback must be callable"):
        train(model, [(x, y)], lambda m, b: m(b[0]).sum(), steps=1, callback=3, progress=False)


def test_history_mean_leaves_out_the_steps_a_metric_was_not_logged_at():
    h = History()
    h.log(step=1, loss=2.0)
    h.log(step=2, loss=1.0, acc=0.5)
    h.log(step=3, loss=0.5, acc=0.7)
    assert h["acc"][0] != h["acc"][0], "an unlogged step holds NaN"
    assert h.mean("acc") == pytest.approx(0.6) and h.mean("acc", last=1) == pytest.approx(0.7)
    assert h.mean("loss") == pytest.approx(3.5 / 3)
    h.log(step=4, loss=0.1)
    with pytest.raises(ValueError, match="'acc' was not logged at any of these steps"):
        h.mean("acc", last=1)
