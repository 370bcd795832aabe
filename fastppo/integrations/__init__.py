"""Drop-in fastppo kernels for other trainers: one module per peer, each with `patch()`,
`unpatch()` and a `patched()` context manager, and each needing only its peer installed
(`pip install 'fastppo[trl]'`, `[verl]`, `[openrlhf]`).

    fastppo.integrations.trl        TRL's log-prob / entropy helpers and its fused LM head
    fastppo.integrations.verl       verl's log-prob / entropy functions and a "fastppo" policy loss
    fastppo.integrations.openrlhf   OpenRLHF's log-prob / entropy functions and its PolicyLoss

Each keeps its peer's conventions (../shared/PEERS.md), not fastppo's, so that a patched run differs
from an unpatched one in speed and memory only.
"""
