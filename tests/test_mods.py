"""The node's mods one by one: the reply allowlist, generic errors, the audit log, node-side clipping."""

import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from client.mods import (
    GuardedClientApp,
    InvalidUpdate,
    PrivacyGuard,
    PrivacyViolation,
    ReplyRules,
    UpdateCheckMod,
    audit_mod,
    check_reply,
    error_code_mod,
    train_privacy_mods,
)
from client.policy import PolicyRefusal
from common import protocol
from common.tasks import get_task

pytestmark = pytest.mark.usefixtures("flower_identity")

TASK = get_task("tagging")
PERSONAL = {"a.lora_A.weight": torch.full((2, 4), 0.25), "a.lora_B.weight": torch.full((4, 2), -0.5)}
USER = "user:p-" + "0" * 32


def _rules(privacy="none", user_labels=False, history=False):
    return ReplyRules(
        privacy=privacy,
        node_metrics=protocol.evaluate_metric_names(TASK, labels=True, history=False)
        | {protocol.NUM_EXAMPLES},
        user_metrics=protocol.evaluate_metric_names(TASK, labels=user_labels, history=history),
        user_records=frozenset({USER}),
        personal_tensors=lambda: PERSONAL.values(),
    )


def _incoming(message_type="train"):
    arrays = ArrayRecord({"a.lora_A.weight": torch.zeros(2, 4), "a.lora_B.weight": torch.zeros(4, 2)})
    return Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=1,
        message_type=message_type,
    )


def _reply(msg, **records):
    return Message(RecordDict(records), reply_to=msg)


def _good_arrays(dtype=torch.float32):
    return ArrayRecord(
        {"a.lora_A.weight": torch.ones(2, 4, dtype=dtype), "a.lora_B.weight": torch.ones(4, 2, dtype=dtype)}
    )


def test_a_train_reply_with_the_shared_adapter_and_allowed_scalars_passes():
    msg = _incoming()
    metrics = MetricRecord({"num-examples": 3, "train-loss": 0.5})
    check_reply(msg, _reply(msg, arrays=_good_arrays(), metrics=metrics), _rules())
    fp16 = _reply(msg, arrays=_good_arrays(torch.float16), metrics=MetricRecord({"num-examples": 3}))
    check_reply(msg, fp16, _rules("local-dp"))


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ({"arrays": _good_arrays(), "personal": _good_arrays()}, "exactly the 'arrays' record"),
        ({"arrays": ArrayRecord({"a.lora_A.weight": torch.ones(2, 4)})}, "differ in keys or shapes"),
        (
            {
                "arrays": ArrayRecord(
                    {"a.lora_A.weight": torch.ones(2, 4), "a.lora_B.weight": torch.ones(4, 3)}
                )
            },
            "differ in keys or shapes",
        ),
        (
            {"arrays": _good_arrays(), "profile": ConfigRecord({"text": "likes horror"})},
            "config records ['profile']",
        ),
        (
            {"arrays": _good_arrays(), "metrics": MetricRecord({"num-examples": 1, "losses": [0.1]})},
            "allowlist",
        ),
        ({"arrays": _good_arrays(), "metrics": MetricRecord({"Bob's diary": 1.0})}, "allowlist"),
        ({"arrays": _good_arrays(), "metrics": MetricRecord({"train-steps": [1, 2]})}, "must be scalars"),
        ({"arrays": _good_arrays(), "other": MetricRecord({"num-examples": 1})}, "one 'metrics' record"),
    ],
)
def test_train_replies_that_would_leak_are_refused(records, message):
    msg = _incoming()
    records.setdefault("metrics", MetricRecord({"num-examples": 1}))
    with pytest.raises(PrivacyViolation) as err:
        check_reply(msg, _reply(msg, **records), _rules())
    assert message in str(err.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_train_reply_equal_to_a_personal_tensor_is_refused(dtype):
    """Same keys and shapes as the shared adapter, so only the digest comparison can catch it."""
    msg = _incoming()
    leaked = ArrayRecord({k: v.to(dtype) for k, v in PERSONAL.items()})
    with pytest.raises(PrivacyViolation, match="equals a personal adapter's tensor"):
        check_reply(msg, _reply(msg, arrays=leaked, metrics=MetricRecord({"num-examples": 1})), _rules())


def test_a_tensor_returned_as_the_server_sent_it_is_not_a_leak():
    msg = _incoming()  # the server sent zeros; a personal adapter's fresh lora_B is zeros too
    zeros = {k: torch.zeros_like(v) for k, v in PERSONAL.items()}
    rules = ReplyRules("none", frozenset(), frozenset(), frozenset(), lambda: zeros.values())
    check_reply(msg, _reply(msg, arrays=ArrayRecord(zeros), metrics=MetricRecord({"num-examples": 1})), rules)


def test_data_dependent_metrics_leave_only_without_a_privacy_setting():
    msg = _incoming()
    reply = _reply(msg, arrays=_good_arrays(), metrics=MetricRecord({"num-examples": 1, "train-loss": 0.5}))
    check_reply(msg, reply, _rules("none"))
    with pytest.raises(PrivacyViolation, match=r"allowlist: \['train-loss'\]"):
        check_reply(msg, reply, _rules("client-dp"))


def test_evaluate_replies_carry_only_allowed_records_and_names():
    msg = _incoming("evaluate")
    node = MetricRecord({"n": 4, "correct": 2, "tp/dravi": 1, "num-examples": 4})
    check_reply(msg, _reply(msg, metrics=node, **{USER: MetricRecord({"n": 4, "correct": 2})}), _rules())
    with pytest.raises(PrivacyViolation, match="not one of this node's users"):
        check_reply(msg, _reply(msg, **{"user:u001": MetricRecord({"n": 4})}), _rules())
    with pytest.raises(PrivacyViolation, match="tp/dravi"):  # a user's label histogram
        check_reply(msg, _reply(msg, **{USER: MetricRecord({"n": 4, "tp/dravi": 1})}), _rules())
    with pytest.raises(PrivacyViolation, match="history"):
        check_reply(msg, _reply(msg, **{USER: MetricRecord({"n": 4, "history": 12})}), _rules())
    check_reply(msg, _reply(msg, **{USER: MetricRecord({"n": 4, "history": 12})}), _rules(history=True))
    with pytest.raises(PrivacyViolation, match="carries arrays"):
        check_reply(msg, _reply(msg, metrics=MetricRecord({"n": 4}), arrays=_good_arrays()), _rules())


def test_no_reply_to_an_unknown_message_type_leaves():
    msg = _incoming("query")
    with pytest.raises(PrivacyViolation, match="no reply to message type 'query'"):
        check_reply(msg, _reply(msg, metrics=MetricRecord({"n": 1})), _rules())


def _context():
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ValueError("line 1: field 'output': 'My secret diary entry about Bob' is not a rating"), 3100),
        (PolicyRefusal("min-noise-multiplier", "z 0.1 for user u001 at /srv/node/.fedoppu"), 3101),
        (PrivacyViolation("reply of user u001"), 3102),
    ],
)
def test_every_exception_leaves_as_a_code_and_fixed_text(error, code, caplog):
    def handler(_msg, _context):
        raise error

    reply = error_code_mod(_incoming(), _context(), handler)
    assert reply.error.code == code and reply.error.reason == protocol.NodeError(code).text
    assert "Bob" not in reply.error.reason and "u001" not in reply.error.reason
    assert str(error) in caplog.text  # the details stay in the node's own log


def test_an_inner_error_reply_loses_its_text():
    msg = _incoming()
    leaky = Message(Error(7, "user u001 at /srv/node"), reply_to=msg)  # e.g. a Flower mod's error
    reply = error_code_mod(msg, _context(), lambda m, c: leaky)
    assert reply.error.code == protocol.NodeError.FAILED and "u001" not in reply.error.reason


def test_the_guarded_app_answers_unknown_types_and_failures_with_codes():
    app = GuardedClientApp(mods=[PrivacyGuard(lambda m, c: _rules())])

    @app.evaluate()
    def evaluate(msg, context):
        raise KeyError("u001")

    assert app(_incoming("query.dump"), _context()).error.code == protocol.NodeError.BAD_REQUEST
    assert app(_incoming("train.exfiltrate"), _context()).error.code == protocol.NodeError.BAD_REQUEST
    assert app(_incoming("evaluate"), _context()).error.code == protocol.NodeError.FAILED


def test_the_audit_log_records_replies_and_error_codes(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDOPPU_AUDIT_LOG", str(tmp_path))
    msg = _incoming("evaluate")
    audit_mod(msg, _context(), lambda m, c: _reply(m, metrics=MetricRecord({"n": 1})))
    audit_mod(msg, _context(), lambda m, c: error_code_mod(m, c, lambda *_: 1 / 0))
    lines = [json.loads(line) for path in tmp_path.glob("*.jsonl") for line in path.read_text().splitlines()]
    assert lines[0]["metrics"] == {"metrics": {"n": "int"}} and lines[0]["error"] is None
    assert lines[1] == {"message_type": "evaluate", "error": protocol.NodeError.FAILED}


def _handler(arrays):
    return lambda msg, context: _reply(msg, arrays=arrays, metrics=MetricRecord({"num-examples": 1}))


def test_under_secagg_a_client_does_not_send_an_update_that_fails_its_own_check():
    check = UpdateCheckMod(max_norm=5.0)
    msg = _incoming()
    assert check(msg, None, _handler(_good_arrays())).content["arrays"]  # update norm 4
    nan = ArrayRecord(
        {"a.lora_A.weight": torch.ones(2, 4), "a.lora_B.weight": torch.full((4, 2), float("nan"))}
    )
    with pytest.raises(InvalidUpdate, match=r"not sent: a.lora_B.weight: 8 non-finite value\(s\)"):
        check(msg, None, _handler(nan))
    scaled = ArrayRecord({k: torch.full(tuple(v.shape), 10.0) for k, v in _good_arrays().items()})
    with pytest.raises(InvalidUpdate, match="update norm 40 exceeds the bound 5"):
        check(msg, None, _handler(scaled))
    for setting in ("secagg", "secagg+dp"):
        mods = train_privacy_mods(setting, 1.0, 0.2, max_update_norm=5.0)
        assert [m.max_norm for m in mods if isinstance(m, UpdateCheckMod)] == [5.0]
