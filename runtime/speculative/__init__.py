"""Speculative decoding: drafters propose tokens, one target pass verifies them (`runtime.speculative.verify`), and
the caches drop what was rejected by the caller's lengths alone (`runtime.backend.Backend.verify`).  Torch-free.

The backend-independent pieces are numpy-only modules, each tested alone:
- `prompt_lookup`: the prompt-lookup drafter (n-gram match in the prompt and the output so far);
- `accept`: which drafts the target accepts, greedy or by speculative sampling (keeps the target's distribution);
- `adapt`: how many tokens to draft next, from the acceptance and the costs seen so far (0 = plain decode);
- `throughput`: the expected tokens per target pass and the break-even acceptance, for the bench.
"""
