"""Built-in probe material. Plain English, cased, with punctuation and numbers."""

from __future__ import annotations

#: Groups of lexically related words. In a correctly paired model, the input-embedding rows
#: of words in one group sit much closer together than rows of random tokens.
WORD_GROUPS: dict[str, list[str]] = {
    "digits": ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
    "numbers": ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"],
    "weekdays": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "months": ["January", "February", "March", "April", "June", "July", "August", "September",
               "October", "November", "December"],
    "colours": ["red", "blue", "green", "yellow", "black", "white", "brown", "purple", "pink",
                "grey"],
    "pronouns": ["he", "she", "they", "we", "you", "him", "her", "them", "us", "me"],
    "kinship": ["mother", "father", "brother", "sister", "son", "daughter", "uncle", "aunt",
                "wife", "husband"],
    "adjectives": ["good", "bad", "big", "small", "happy", "sad", "hot", "cold", "new", "old"],
    "animals": ["dog", "cat", "horse", "cow", "sheep", "pig", "bird", "fish", "mouse", "rabbit"],
    "body": ["head", "hand", "foot", "eye", "ear", "nose", "mouth", "arm", "leg", "finger"],
}

#: Ordinary English for the unknown-token rate and the language-model affinity probe.
PARAGRAPH = (
    "On Tuesday, 14 March 2023, the city council met at 9:30 a.m. to discuss the new budget. "
    "The mayor said that spending on schools would rise by 4.5%, while the cost of repairing "
    "roads and bridges had grown faster than expected. Several residents asked why the library "
    "would close earlier in the evening; one of them, a retired teacher, said it was the only "
    "quiet place where her grandchildren could study. After a long debate, the council agreed "
    "to review the plan again next month."
)

#: Unrelated texts of very different lengths, for the collapse and batch-invariance probes.
DIVERSE = [
    "I absolutely loved this film; the acting was wonderful and the ending made me cry.",
    "The service was slow, the food was cold, and we will never come back.",
    "Interest rates rose by a quarter of a point on Wednesday.",
    "The striker scored twice in the second half to win the match.",
    "Mix the flour and sugar, then add two eggs and stir until smooth.",
    "Install the package, then restart the server before running the tests.",
    "What a terrible, boring waste of two hours.",
    "A gentle, funny and beautifully made story about growing up.",
]

#: A long text to pad the batch-invariance probe (its length differs a lot from the others).
LONG = " ".join([PARAGRAPH] * 2)

#: Prompts for the generation collapse probe.
PROMPTS = [
    "The capital of France is",
    "def add(a, b):\n    return",
    "My favourite colour is",
    "1, 2, 3, 4,",
    "Once upon a time, in a small village,",
    "The chemical symbol for water is",
]
