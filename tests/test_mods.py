import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.mods import InvalidUpdate, PrivacyViolation, UpdateCheckMod, check_reply, train_privacy_mods

pytestmark = pytest.mark.usefixtures("flower_identity")


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


def test_a_train_reply_with_the_shared_adapter_and_scalars_passes():
    msg = _incoming()
    check_reply(
        msg, _reply(msg, arrays=_good_arrays(), metrics=MetricRecord({"num-examples": 3, "train-loss": 0.5}))
    )
    check_reply(
        msg, _reply(msg, arrays=_good_arrays(torch.float16), metrics=MetricRecord({"num-examples": 3}))
    )


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
        ({"arrays": _good_arrays(), "metrics": MetricRecord({"losses": [0.1, 0.2]})}, "must be scalars"),
    ],
)
def test_train_replies_that_would_leak_are_refused(records, message):
    msg = _incoming()
    with pytest.raises(PrivacyViolation) as err:
        check_reply(msg, _reply(msg, **records))
    assert message in str(err.value)


@pytest.mark.parametrize("message_type", ["evaluate", "train.personalize"])
def test_other_replies_carry_metrics_only(message_type):
    msg = _incoming(message_type)
    check_reply(msg, _reply(msg, metrics=MetricRecord({"n": 4, "correct": 2})))
    with pytest.raises(PrivacyViolation, match="carries arrays"):
        check_reply(msg, _reply(msg, arrays=_good_arrays()))


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
        mods = train_privacy_mods({"privacy": setting, "max-update-norm": 5.0})
        assert [m.max_norm for m in mods if isinstance(m, UpdateCheckMod)] == [5.0]
