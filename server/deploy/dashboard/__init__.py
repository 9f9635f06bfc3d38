"""The coordinator's live page and Prometheus metrics (`python -m server.coordinator dashboard FED`).

Read-only: everything comes from what the coordinator already holds (FED/federation.json,
FED/server/registry.json, launches.jsonl, the head runs' configs, each run's rounds.jsonl,
live.json, outcome.json, audit.jsonl and its anchor, evaluation.json, a release's model_card.json)
and from Flower's Control API (which nodes are online); nothing is written, and only aggregates a
run already records reach the page. Imports no torch (it runs beside the SuperLink for weeks).

    view.py     what the page shows, read from those files (FederationView)
    files.py    each file parsed once per change; growing files from where they were last read, folded
    states.py   a site's states, in the page's and /metrics' words (provisioned ... unknown; ok ... absent)
    nodes.py    online / last seen of each node (Control API ListNodes, asked by a thread of its own)
    plots.py    the privacy and AUROC plots as SVG (matplotlib)
    metrics.py  /metrics in Prometheus's text format
    app.py      the web app (Starlette): GET only, the token, the page and its panels
    serve.py    the command: checks the address, port and token, runs uvicorn
"""
