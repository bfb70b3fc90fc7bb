"""runtime.speculative.prompt_lookup against transformers' PromptLookupCandidateGenerator, called directly: the
same drafts on random and structured token sequences, for every n-gram size, draft count, end-of-sequence set and
length budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

from runtime.speculative.prompt_lookup import PromptLookup


def _reference(tokens, num_tokens: int, max_ngram: int, eos_ids=(), max_length: int | None = None) -> list[int]:
    """transformers' drafts for `tokens` (its candidates minus the input)."""
    gen = PromptLookupCandidateGenerator(
        eos_token_id=torch.tensor(eos_ids, dtype=torch.long) if eos_ids else None,
        num_output_tokens=num_tokens,
        max_matching_ngram_size=max_ngram,
        max_length=max_length if max_length is not None else len(tokens) + num_tokens + 100,
    )
    ids = torch.tensor([list(tokens)], dtype=torch.long)
    candidates, logits = gen.get_candidates(ids)
    assert logits is None
    return candidates[0, len(tokens) :].tolist()


def _random_cases(count: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        vocab = int(rng.integers(2, 9))  # small vocabularies: matches of every size are common
        length = int(rng.integers(1, 60))
        tokens = rng.integers(0, vocab, length)
        eos = tuple(int(e) for e in rng.choice(vocab, int(rng.integers(0, 3)), replace=False))
        yield tokens, int(rng.integers(1, 11)), int(rng.integers(1, 5)), eos


def _structured_cases():
    """Sequences whose answers copy from their prompt, periodic ones, constant ones, and the smallest ones."""
    rng = np.random.default_rng(11)
    prompt = rng.integers(0, 1000, 40)
    yield np.concatenate([prompt, prompt[5:12]]), 8, 3, ()  # the output quotes the prompt: continue the quote
    yield np.concatenate([prompt, prompt[5:12]]), 8, 3, (int(prompt[14]),)  # ... up to an end-of-sequence token
    yield np.concatenate([prompt, prompt[5:12]]), 8, 3, (int(prompt[12]),)  # eos first: no drafts at all
    yield np.concatenate([prompt, prompt[30:40]]), 8, 2, ()  # the quote reaches the prompt's end: fewer drafts
    yield np.tile([7, 8, 9], 10), 10, 2, ()  # periodic: the earliest occurrence wins
    yield np.tile([7, 8, 9, 7, 8, 5], 6), 5, 3, ()  # 2-gram (7, 8) is followed by 9 and by 5
    yield np.full(30, 4), 6, 4, ()  # constant
    yield np.full(30, 4), 6, 4, (4,)
    yield np.array([3]), 5, 2, ()  # one token: nothing to match
    yield np.array([3, 3]), 5, 2, ()
    yield np.array([3, 4]), 5, 2, ()
    yield np.arange(50), 5, 2, ()  # no repeat at all
    yield np.array([1, 2, 3, 9, 2, 3, 8, 3]), 4, 3, ()  # the 3-gram fails, the 2-gram (no), the 1-gram wins
    yield np.array([5, 1, 2, 6, 1, 2, 7, 0, 1, 2]), 3, 2, ()  # the 2-gram's earliest occurrence, not its latest
    yield np.array([1, 2, 3, 1, 2, 3, 4, 1, 2, 3]), 3, 3, ()  # the 3-gram beats the later 2-gram matches


def _cases():
    yield from _structured_cases()
    yield from _random_cases(1500, seed=0)


def test_same_drafts_as_transformers():
    checked = drafted = 0
    for tokens, num, max_ngram, eos in _cases():
        ours = PromptLookup(max_ngram=max_ngram, eos_ids=eos).propose(tokens, num)
        ref = _reference(tokens.tolist(), num, max_ngram, eos)
        assert ours.dtype == np.int64 and ours.tolist() == ref, (tokens.tolist(), num, max_ngram, eos, ours, ref)
        checked += 1
        drafted += bool(ref)
    assert drafted > checked // 2  # the cases exercise drafting, not only "no match"


def test_structured_drafts():
    """The rules by hand, independent of both implementations."""
    quote = np.array([10, 11, 12, 13, 14, 15, 99, 12, 13])
    assert PromptLookup().propose(quote, 3).tolist() == [14, 15, 99]
    assert PromptLookup(eos_ids=(15,)).propose(quote, 3).tolist() == [14]
    assert PromptLookup(eos_ids=(14,)).propose(quote, 3).tolist() == []
    assert PromptLookup().propose(np.array([1, 2, 3, 1, 2, 4, 1, 2]), 1).tolist() == [3]  # earliest
    assert PromptLookup().propose(np.array([1, 2, 3, 1, 2, 4, 1, 2]), 10).tolist() == [3, 1, 2, 4, 1, 2]  # to the end
    assert PromptLookup(max_ngram=1).propose(np.array([5, 2, 7, 9, 2]), 2).tolist() == [7, 9]


@pytest.mark.parametrize("budget", range(0, 7))
def test_length_budget_cuts_transformers_drafts(budget):
    """transformers clips by `max_length` inside the sequence and crops accepted tokens to the budget afterwards;
    ours drafts only the budget: the tokens that can be accepted are the same."""
    for tokens, num, max_ngram, eos in _random_cases(200, seed=budget + 1):
        max_length = len(tokens) + 1 + budget  # room for `budget` drafts and the target's own next token
        ours = PromptLookup(max_ngram=max_ngram, eos_ids=eos).propose(tokens, min(num, budget))
        ref = _reference(tokens.tolist(), num, max_ngram, eos, max_length=max_length)
        assert ours.tolist() == ref[:budget], (tokens.tolist(), num, max_ngram, eos, budget)


def test_inputs_of_other_types():
    tokens = [4, 5, 6, 4, 5]
    for form in (tokens, tuple(tokens), np.array(tokens, np.int32), np.array(tokens, np.uint16)):
        assert PromptLookup().propose(form, 3).tolist() == [6, 4, 5]
    assert PromptLookup().propose([], 3).tolist() == []
    drafts = PromptLookup().propose(np.array(tokens), 3)
    drafts[0] = -1  # the drafts are a copy, not a view of the caller's tokens
    assert PromptLookup().propose(np.array(tokens), 3).tolist() == [6, 4, 5]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: PromptLookup(max_ngram=0), "max_ngram"),
        (lambda: PromptLookup(max_ngram=2.0), "max_ngram"),
        (lambda: PromptLookup(eos_ids=[1]), "eos_ids"),
        (lambda: PromptLookup().propose([1, 2], -1), "num_tokens"),
        (lambda: PromptLookup().propose([1, 2], 1.5), "num_tokens"),
        (lambda: PromptLookup().propose(np.array([1.0, 2.0]), 1), "integer token ids"),
        (lambda: PromptLookup().propose(np.array([[1, 2]]), 1), "1-D"),
    ],
)
def test_bad_arguments_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def _plain_lookup(tokens, num: int, max_ngram: int, eos=(), unambiguous: bool = False) -> list[int]:
    """Prompt lookup from its definition, in plain Python: the largest n-gram (n <= max_ngram, not the whole
    sequence) ending the sequence that occurs earlier followed by a token; its earliest occurrence's continuation,
    cut before an end-of-sequence token.  ``unambiguous``: a 1-gram match whose occurrences are followed by
    different tokens drafts nothing."""
    t = [int(x) for x in tokens]
    size = len(t)
    for n in range(min(max_ngram, size - 1), 0, -1):
        starts = [i for i in range(size - n) if t[i:i + n] == t[size - n:]]
        if not starts:
            continue
        if unambiguous and n == 1 and len({t[i + 1] for i in starts}) > 1:
            return []
        out = t[starts[0] + n: starts[0] + n + num]
        for j, x in enumerate(out):
            if x in eos:
                return out[:j]
        return out
    return []


def test_unambiguous_unigram_against_plain_reference():
    """The option against the plain-Python definition; the definition without it is transformers' (checked here
    too, so the reference is tied to transformers and the option differs only where a 1-gram is ambiguous)."""
    fired = kept = 0
    for tokens, num, max_ngram, eos in list(_cases())[:800]:
        ours = PromptLookup(max_ngram=max_ngram, eos_ids=eos, unambiguous_unigram=True).propose(tokens, num)
        ref = _plain_lookup(tokens, num, max_ngram, eos, unambiguous=True)
        assert ours.tolist() == ref, (tokens.tolist(), num, max_ngram, eos)
        plain = _plain_lookup(tokens, num, max_ngram, eos)
        assert plain == _reference(tokens.tolist(), num, max_ngram, eos)
        fired += bool(plain) and not ref
        kept += bool(ref)
    assert fired > 50 and kept > 100, (fired, kept)


def test_unambiguous_unigram_by_hand():
    """A separator seen after every term drafts nothing; a token seen once (or always followed alike) drafts."""
    seq = np.array([40, 41, 10, 3, 11, 3, 12, 3, 13, 42, 20, 3])  # "10 , 11 , 12 , 13 ? 20 ,"
    assert PromptLookup().propose(seq, 3).tolist() == [11, 3, 12]  # transformers: the first "," 's continuation
    assert PromptLookup(unambiguous_unigram=True).propose(seq, 3).tolist() == []
    seq = np.array([40, 41, 10, 3, 11, 3, 12, 3, 13, 42, 20, 3, 11])  # "... 11": a 2-gram (",", 11) matches
    assert PromptLookup(unambiguous_unigram=True).propose(seq, 4).tolist() == [3, 12, 3, 13]
    seq = np.array([40, 41, 10, 3, 11, 3, 12, 3, 13, 42, 20, 12])  # "12" seen once: its continuation
    assert PromptLookup(unambiguous_unigram=True).propose(seq, 2).tolist() == [3, 13]
    seq = np.array([7, 8, 1, 7, 8, 2, 9, 7])  # 7 always followed by 8: not ambiguous
    assert PromptLookup(unambiguous_unigram=True, max_ngram=1).propose(seq, 2).tolist() == [8, 1]
    with pytest.raises(ValueError, match="unambiguous_unigram"):
        PromptLookup(unambiguous_unigram=1)
