"""Agentic and safety evaluation of any OpenAI-compatible endpoint: `k2 eval-toolcall`
(tool-call conformance), `k2 eval-agent` (multi-turn episodes in simulated environments) and
`k2 redteam` (plugins x strategies, judged by a rubric)."""
