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

#: (query, its passage) pairs on unrelated topics, for rerankers: each query must score its
#: own passage above the other seven (a wrong tokenizer or a collapsed model cannot).
RERANK_PAIRS = [
    ("How do I bake bread at home?",
     "Mix flour, water, yeast and salt, knead the dough, let it rise for an hour, then bake "
     "it in a hot oven until the crust is brown."),
    ("What did the central bank do to interest rates?",
     "The central bank raised interest rates by a quarter of a point on Wednesday to slow "
     "inflation, its third rise this year."),
    ("Who won the football match?",
     "The home side won the match 2-1 after their striker scored twice in the second half."),
    ("How do I install the software?",
     "Download the installer, run it as an administrator, then restart the computer before "
     "opening the program."),
    ("Is the new film worth watching?",
     "Critics praised the new film for its wonderful acting and moving ending, calling it "
     "the best picture of the year."),
    ("What will the weather be like tomorrow?",
     "Tomorrow will be cold and windy, with heavy rain in the morning and snow on the hills "
     "by the evening."),
    ("Who won the general election?",
     "The opposition party won the general election with a large majority, and its leader "
     "will become prime minister next week."),
    ("What are the symptoms of flu?",
     "Flu symptoms include fever, a sore throat, aching muscles, tiredness and a cough that "
     "can last for weeks."),
]
