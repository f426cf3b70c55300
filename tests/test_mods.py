import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.mods import PrivacyViolation, check_reply

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
