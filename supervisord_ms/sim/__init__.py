"""The modelserverd simulator: an SGLang stand-in for hosts without GPUs.

Run it as ``python -m supervisord_ms.sim --model-path M --port 30000 [--sim-* knobs]``
(``--help`` lists the knobs). It serves SGLang's HTTP API with simulated latency
and faults and holds memory in the ``file:`` GPU view. It is clearly not a
real model: its log, ``/get_model_info`` and ``/v1/models`` say so.

This package stays light (no aiohttp import here) because every simulated
child process imports it on start.
"""

from __future__ import annotations

BANNER = "modelserverd simulator (not a real model)"

__all__ = ["BANNER"]
