"""SecAgg+ (Bell et al. 2020) under modality-aware weights: the protocol's steps for both sides.

The coordinator learns, per parameter group, only the sums over the sites holding it of
w_k * x_k and of w_k (x_k a site's clipped update, w_k its count), and only for a group with at
least `min_holders` surviving holders. Each step is a pure function of a message and the side's
own round state; no step does I/O, so the same steps run under Flower's Message API, in
simulation and in tests.

The share graph is complete (SecAgg+ with k = n - 1 neighbours: every site shares with and masks
against every other): at the federation's scale (3-12 sites) its O(n) shares a site are a few kB
(docs/performance.md), and a sparse graph would need per-group neighbourhoods, or a site could be
left with no pairwise mask on a group none of its neighbours holds, and that group's unmasking
would expose it.

Stages of one round (the server relays every message; sites never talk to each other directly):
  0  server -> sites  SecAggConfig                 (config.py)
  1  site -> server   PublicKeys                   SiteRound.advertise     (site.py)
     server -> sites  KeyDirectory                 ServerRound.key_directory (server.py)
  2  site -> server   EncryptedShares              SiteRound.share_keys
     server -> site   ShareInbox                   ServerRound.route_shares
  3  site -> server   MaskedInput                  SiteRound.mask
     server -> sites  UnmaskRequest                ServerRound.unmask_request
  4  site -> server   UnmaskShares                 SiteRound.unmask
     server           SecureAggregate              ServerRound.aggregate

Key rounds (`key_rounds`): stages 0-2 of several consecutive rounds may run at once, each round
with its own keys, seeds and shares; a later round's mask stage then brings its own config, which
may differ from the one its keys were made for only in MASK_TIME_FIELDS (`SiteRound.finalise`,
`ServerRound.finalise`, config.py).

Beside the steps: field.py (clipping, quantisation, the error bound), masks.py and keys.py (the
PRG and the X25519 agreement), layout.py (a group's update as one vector), messages.py (the
messages, whose flat form for a ConfigRecord is healthfm_core/protocol/secure_records.py),
simulate.py (one round in process, with the transcript of what the server received),
transcript.py (a recorded round on disk: the only module here that does I/O, with replay.py, the
attack replay a privacy officer runs on one).

Imports: flwr.common.secure_aggregation (Shamir, Fernet encryption, quantisation), numpy,
cryptography, pydantic and healthfm_core; never client/ or server/ (both of them call this room).
"""
