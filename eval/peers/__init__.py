"""The peer quality benchmark: our SAE against sparsify's and SAELens's on identical activations."""
