"""Make "TDLRT" a PEFT method: a member of the closed ``PeftType`` enum plus ``register_peft_method``.

``register_peft_method`` (peft >= 0.15) refuses names that are not ``PeftType`` members, so the member is
added first with a small stdlib routine (what ``aenum.extend_enum`` does). Both steps are idempotent: a
second import, or a reload, is harmless.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

PEFT_TYPE_NAME = "TDLRT"
PREFIX = "tdlrt_"


def peft_type() -> PeftType:
    """The ``PeftType.TDLRT`` member, created on first use."""
    members = PeftType.__members__
    if PEFT_TYPE_NAME in members:
        return members[PEFT_TYPE_NAME]
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    member.__objclass__ = PeftType
    member.__init__(PEFT_TYPE_NAME)
    if hasattr(PeftType, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    PeftType._member_names_.append(PEFT_TYPE_NAME)
    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)
    return member


def register(config_cls, model_cls) -> None:
    """Register the config and tuner with PEFT (``get_peft_model``, ``PeftModel.from_pretrained``, ...)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    member = peft_type()
    if PEFT_TYPE_TO_TUNER_MAPPING.get(member) is model_cls:
        return
    PEFT_TYPE_TO_TUNER_MAPPING.pop(member, None)   # a reloaded module re-registers its new classes
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

    PEFT_TYPE_TO_CONFIG_MAPPING.pop(member, None)
    PEFT_TYPE_TO_PREFIX_MAPPING.pop(member, None)
    register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)
