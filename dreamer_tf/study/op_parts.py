"""Parts of the Dreamer model from TF op names (for `dreamer_tf.study.profile`): Keras layer names,
tf.scan/tf.cond scopes, TFP's `<Dist>_CONSTRUCTED_AT_<layer>` scopes and the `gradient_tape/`
prefix of gradient ops tell encoder, observe loop, decoder, heads, imagination, KL, their gradients
and the optimiser apart."""
from __future__ import annotations

import bisect
import re
from collections import defaultdict
from typing import Iterable, Mapping

__all__ = ["PartMapper", "PARTS", "FORWARD_PARTS", "PART_HELP", "GRAD_OTHER", "OPTIMISER", "OTHER"]

# --------------------------------------------------------------------------------------------
# Parts of the model, from op names.

ENCODER, OBSERVE, DECODER, HEADS, IMAGINE, BEHAVIOUR_HEADS, KL = (
    "encoder", "observe loop", "decoder", "heads (world model)", "imagination", "heads (behaviour)",
    "KL & entropies")
FORWARD_PARTS = (ENCODER, OBSERVE, DECODER, HEADS, IMAGINE, BEHAVIOUR_HEADS, KL)
GRAD_OTHER, OPTIMISER, OTHER = "gradients (other)", "optimiser", "other"
PARTS = FORWARD_PARTS + tuple(f"grad {p}" for p in FORWARD_PARTS) + (GRAD_OTHER, OPTIMISER, OTHER)

PART_HELP = {
    ENCODER: "image (and state) encoder: convolutions and pixel preprocessing (`encoder_*`, `state_encoder_*`)",
    OBSERVE: "RSSM over the sequence: the first `tf.scan` (`scan/...`), the `representation_*` layers and "
             "the `transition_*` calls of the observe loop (the first `batch_length` calls when unrolled, "
             "else the one step tf.scan traces outside its loop)",
    DECODER: "image decoder and its Gaussian log-likelihood (`decoder_*`, `*_CONSTRUCTED_AT_decoder_*`)",
    HEADS: "the world model's heads on the posterior features with their likelihoods: the first `reward_*` "
           "and `pcont_*` calls, `state_decoder_*`, `state_model_*`",
    BEHAVIOUR_HEADS: "heads of behaviour learning: the later `reward_*`/`pcont_*` calls (on the imagined "
                     "features, for the lambda returns), every `value_*` call (returns and value loss) with "
                     "its likelihood, and the last `actor_*` call (the entropy metric on posterior features)",
    IMAGINE: "imagined rollout: the second `tf.scan` (`scan_1/...`), and the actor and `transition_*` calls "
             "of the rollout outside it (its first step, or all `horizon` steps when unrolled)",
    KL: "KL divergence and posterior/prior entropies (`KullbackLeibler/`, `IndependentNormal*/entropy`)",
    GRAD_OTHER: "gradient ops (`gradient_tape/...`, top-level `AddN` aggregation) whose forward op is "
                "not in a part (slices, concats, the lambda return, losses)",
    OPTIMISER: "gradient clipping norms, finite checks and Adam updates (`global_norm*`, `cond*/` apply "
               "branches, `*_opt/`)",
    OTHER: "everything else: unscoped ops (lambda return and loss arithmetic, transposes, slices, "
           "concats, sampling noise, the RSSM's Gaussian heads outside the loops)",
}

_SUFFIX = re.compile(r"^(.*?)(?:_(\d+))?$")
_CONSTRUCTED = re.compile(r"_CONSTRUCTED_AT_(.+)$")
_SCAN = re.compile(r"^scan(?:_(\d+))?$")
_OPT = re.compile(r"^(?:model|actor|value)_opt(?:_loss_scale)?(?:_\d+)?$")
_TOP_OPTIMISER = re.compile(r"^(?:cond(?:_\d+)?|global_norm(?:_\d+)?|IsFinite(?:_\d+)?|LogicalAnd(?:_\d+)?)$")
_TOP_ADDN = re.compile(r"^AddN(?:_\d+)?$")

_ENCODERS = {"encoder", "state_encoder"}
_DECODERS = {"decoder"}
_HEADS = {"state_decoder", "state_model"}
_SHARED_HEADS = {"reward", "pcont"}  # first call: world model loss; later calls: imagined returns
_TRANSITION = {"transition_in", "transition_gru", "transition_hidden", "transition_out"}
_REPRESENTATION = {"representation_hidden", "representation_out"}
_RANKED = _TRANSITION | _SHARED_HEADS | {"actor"}


def _split_suffix(segment: str) -> tuple[str, int]:
    """`transition_in_3` -> ("transition_in", 3); `encoder` -> ("encoder", 0)."""
    base, number = _SUFFIX.match(segment).groups()
    return base, int(number) if number is not None else 0


def _strip_gradient(name: str) -> tuple[str, bool]:
    """(the forward name a gradient op refers to, whether it is a gradient op)."""
    if name.startswith("gradient_tape/"):
        return name[len("gradient_tape/"):], True
    return name, "/gradient_tape/" in name


class PartMapper:
    """Maps an op name to a part of the model (one of `PARTS`).

    Keras names the k-th call of a layer inside one graph `<layer>_<n>` with n increasing in call
    order (2k - 1 in Keras 3), so calls of one layer by different parts are told apart by the rank
    of n among all the names seen: `observe_calls` transition calls belong to the observe loop (1
    when the loop is a tf.scan, which traces one step outside its while loop; batch_length when
    unrolled), the next ones to the imagination; the first `imagine_calls` actor calls (1 or
    horizon) to the imagination, later ones (the entropy metric) to the behaviour heads; the first
    reward/pcont call to the world model's heads, later ones (on imagined features) to the
    behaviour heads. tf.scan scopes: the first `scan` is the observe loop, the second the
    imagination. `fit(names)` must see all op names of the step (forward and gradient).
    """

    def __init__(self, observe_calls: int = 1, imagine_calls: int = 1, names: Iterable[str] = ()):
        self.observe_calls, self.imagine_calls = int(observe_calls), int(imagine_calls)
        self._numbers: dict[str, list[int]] = defaultdict(list)
        self._scans: list[int] = []
        self.fit(names)

    @classmethod
    def for_config(cls, config: Mapping, names: Iterable[str] = ()) -> "PartMapper":
        unroll = bool(config["unroll"])
        return cls(config["batch_length"] if unroll else 1, config["horizon"] if unroll else 1, names)

    def fit(self, names: Iterable[str]) -> "PartMapper":
        numbers, scans = defaultdict(set, {k: set(v) for k, v in self._numbers.items()}), set(self._scans)
        for name in names:
            forward, _ = _strip_gradient(name)
            first = forward.split("/", 1)[0]
            match = _SCAN.match(first)
            if match:
                scans.add(int(match.group(1) or 0))
            constructed = _CONSTRUCTED.search(first)
            base, number = _split_suffix(constructed.group(1) if constructed else first)
            if base in _RANKED:
                numbers[base].add(number)
        self._numbers = {k: sorted(v) for k, v in numbers.items()}
        self._scans = sorted(scans)
        return self

    def _rank(self, base: str, number: int) -> int:
        numbers = self._numbers.get(base, [])
        return bisect.bisect_left(numbers, number)

    def _layer_part(self, layer: str) -> str | None:
        base, number = _split_suffix(layer)
        if base in _ENCODERS:
            return ENCODER
        if base in _DECODERS:
            return DECODER
        if base in _HEADS:
            return HEADS
        if base in _SHARED_HEADS:
            return HEADS if self._rank(base, number) == 0 else BEHAVIOUR_HEADS
        if base == "value":
            return BEHAVIOUR_HEADS
        if base in _REPRESENTATION:
            return OBSERVE
        if base in _TRANSITION:
            rank = self._rank(base, number)
            if rank < self.observe_calls:
                return OBSERVE
            return IMAGINE if rank < self.observe_calls + self.imagine_calls else None
        if base == "actor":
            return IMAGINE if self._rank(base, number) < self.imagine_calls else BEHAVIOUR_HEADS
        if layer == "top_level":
            return KL
        return None

    def _forward_part(self, name: str) -> str | None:
        segments = name.split("/")
        first = segments[0]
        match = _SCAN.match(first)
        if match:
            number = int(match.group(1) or 0)
            index = bisect.bisect_left(self._scans, number) if self._scans else number
            return (OBSERVE, IMAGINE)[index] if index < 2 else None
        if first == "KullbackLeibler" or (first.startswith("IndependentNormal") and len(segments) > 1
                                          and segments[1] == "entropy"):
            return KL
        constructed = _CONSTRUCTED.search(first)
        if constructed:
            return self._layer_part(constructed.group(1))
        return self._layer_part(first)

    def __call__(self, name: str) -> str:
        """The part of the op named `name` (`scope/.../op`, without the `:Type`)."""
        forward, is_gradient = _strip_gradient(name)
        segments = forward.split("/")
        if _TOP_OPTIMISER.match(segments[0]) or any(_OPT.match(s) for s in segments):
            return OPTIMISER
        part = self._forward_part(forward)
        if is_gradient:
            return f"grad {part}" if part else GRAD_OTHER
        if part is None and _TOP_ADDN.match(segments[0]):
            # tape.gradient sums the gradients of a tensor used more than once (grappler may turn a
            # large sum into `AddN_<n>/tmp_var...` accumulation ops)
            return GRAD_OTHER
        return part or OTHER


