"""Latent explainability: explain -> simulate -> score (Bills et al. 2023, "Language models can explain
neurons in language models"), applied to SAE latents and, for comparison, to the LM's MLP neurons.

records.py     top-activating and random excerpts per unit (latent or neuron), from held-out text
prompts.py     the explainer and simulator prompts (activations as integers 0-10)
explainers.py  TokenLookupExplainer (LM-free baseline), LLMExplainer
simulators.py  TokenLookupSimulator, EmbeddingSimulator (offline), LLMSimulator (all at once)
backends.py    a local transformers causal LM; http.py: an OpenAI-compatible server
scoring.py     Pearson correlation of simulated and true activations (top-and-random, random-only)
detection.py   detection and fuzzing (Paulo et al. 2024): yes/no questions, balanced accuracy, F1, AUC
classifiers.py the scorers that answer them: token-lookup, embedding, n2g, LLM (yes/no logprobs)
pipeline.py    explain and score many units, with the neuron baseline and a shuffled control
puzzles.py     synthetic latents with known explanations: `python -m eval.explain puzzles`
n2g.py         N2G token-pattern explanations (Foote et al.), scored by precision and recall (`--n2g N`)
"""
