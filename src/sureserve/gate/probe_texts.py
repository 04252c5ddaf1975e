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

#: English function words: a sparse (SPLADE) model weights a text's content words above
#: these; a model reading the wrong token ids cannot tell them apart (the sparse probe)
_STOPWORDS = (
    "a an the and or but of to in on at by for with from as is are was were be been it its "
    "this that these those i we you he she they me my our your their them us will would can "
    "could not no so then than too very just also into about after before up down out over "
    "under again had has have did do does there where which who what when why how")
STOPWORDS = frozenset(_STOPWORDS.split())

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
#: own passage above the other seven. A query shares no content word with its passage, so
#: only a model that reads the meaning passes: with a shuffled tokenizer the exact-match
#: signal survives (the same wrong ids on both sides), which pairs sharing words would
#: let through (rerank-demo with a shuffled tokenizer: 4 of 8 with shared words, 0 of 8
#: with these; 8 of 8 with its own).
RERANK_PAIRS = [
    ("How do I make a loaf at home?",
     "Mix flour, water, yeast and salt, knead the dough, leave it to rise, then put it in a "
     "hot oven until the crust turns brown."),
    ("What did the central bank decide about borrowing costs?",
     "Policymakers lifted the benchmark rate by a quarter point on Wednesday to cool rising "
     "prices."),
    ("Who won the football game?",
     "The home side beat their rivals 2-1 after the striker scored twice in the second half."),
    ("How do I set up the program on my computer?",
     "Download the installer, run it as administrator, then restart the machine before "
     "opening the application."),
    ("Is the new movie worth seeing?",
     "Critics praised the picture for its wonderful acting and moving ending, calling it the "
     "best of the year."),
    ("What will the weather be like tomorrow?",
     "Expect cold winds, heavy rain in the morning and snow on the hills by evening."),
    ("Who won the general election?",
     "The opposition party secured a large majority at the polls, and its leader will become "
     "prime minister next week."),
    ("What are the signs of flu?",
     "Fever, a sore throat, aching muscles, tiredness and a cough that lingers for weeks are "
     "typical of influenza."),
]
