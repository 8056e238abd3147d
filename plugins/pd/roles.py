"""The pod role label of llm-d's disaggregated serving, and the role values each stage accepts.

Values (llm-d `docs/disaggregation.md`): encode, prefill, decode, encode-prefill, encode-decode, prefill-decode,
encode-prefill-decode, and `both` (deprecated, = prefill-decode). Matching is exact and case-sensitive, as
Kubernetes label values are. A pod whose label is absent, or present with an empty value, is *unlabeled*.
"""

from __future__ import annotations

from collections.abc import Iterable

from epp.datastore.endpoint import Endpoint

ROLE_LABEL = "llm-d.ai/role"

# The role values `decode-filter` keeps (llm-d's set; `encode-decode` is not among them upstream).
DECODE_ROLES = frozenset({"decode", "prefill-decode", "both", "encode-prefill-decode"})
# The role values `prefill-filter` keeps.
PREFILL_ROLES = frozenset({"prefill", "encode-prefill", "prefill-decode", "both", "encode-prefill-decode"})


def filter_by_role(endpoints: Iterable[Endpoint], roles: frozenset[str], keep_unlabeled: bool) -> list[Endpoint]:
    """The endpoints whose role is in `roles`, plus the unlabeled ones when `keep_unlabeled`, in input order."""
    out: list[Endpoint] = []
    for ep in endpoints:
        role = ep.labels.get(ROLE_LABEL)
        keep = (role in roles) if role else keep_unlabeled
        if keep:
            out.append(ep)
    return out
