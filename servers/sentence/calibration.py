"""A small bundled text set that int8 quantization is calibrated on (servers/sentence/exported.py).

Calibration only needs the range each activation channel takes, so the set mixes what servers
see: one-word queries, questions, short statements and passages of a few sentences. It is not
the set the accuracy is measured on (bench/sentence_throughput.py and the tests use their own).
"""

from __future__ import annotations

WORDS = ["hello", "yes", "search", "Berlin", "invoice", "help", "2024", "login", "refund", "price", "OK", "weather"]

QUERIES = [
    "how do I reset my password",
    "what is the capital of Australia?",
    "best way to store embeddings for search",
    "symptoms of vitamin D deficiency",
    "python list comprehension with condition",
    "When does the store open on Sundays?",
    "cheap flights from Madrid to Lisbon in May",
    "difference between a loan and a mortgage",
    "Who wrote the novel Middlemarch?",
    "error: connection refused on port 5432",
    "how many grams are in a cup of flour",
    "is it safe to drink tap water in Prague",
]

STATEMENTS = [
    "The meeting has been moved to Thursday afternoon.",
    "Our quarterly revenue grew by twelve percent compared with last year.",
    "Please attach the signed contract before Friday.",
    "The museum is closed for renovation until further notice.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The train to Munich was delayed by forty minutes because of a signal failure.",
    "Add two eggs, whisk well, and fold in the melted butter.",
    "This laptop has a 14-inch display, 16 GB of memory and a 512 GB SSD.",
    "The patient reported mild headaches and occasional dizziness.",
    "Customers can return unused items within 30 days for a full refund.",
    "The library offers free workshops on data analysis every month.",
    "A strong earthquake struck the coast early on Monday morning.",
]

PASSAGES = [
    "Vector search finds the documents whose embeddings are closest to the query's embedding. "
    "An index such as HNSW trades a little recall for a large speed-up. Rerankers then score the "
    "top candidates again with a cross-encoder, which reads the query and the document together.",
    "The river rises in the mountains and flows east for nearly three hundred kilometres before it "
    "reaches the sea. Several dams along its course produce electricity for the region, and its "
    "delta is a protected wetland where thousands of birds spend the winter.",
    "To configure the service, copy the example file, set the database URL and the secret key, and "
    "restart the process. Logs are written to the standard output; in production they are collected "
    "by the journal and rotated daily.",
    "Our return policy is simple: if you are not satisfied, send the item back within thirty days. "
    "We refund the full price, including shipping, once the parcel arrives at our warehouse. "
    "Items that were damaged by use cannot be returned.",
]


def texts() -> list[str]:
    """The calibration texts, in a fixed order."""
    return [*WORDS, *QUERIES, *STATEMENTS, *PASSAGES]


def pairs() -> tuple[list[str], list[str]]:
    """Query/document pairs for a cross-encoder: every query beside statements and passages."""
    documents = [*STATEMENTS, *PASSAGES]
    queries = [*WORDS[:4], *QUERIES]
    left, right = [], []
    for i, q in enumerate(queries):
        for d in documents[i % 4 :: 4]:
            left.append(q)
            right.append(d)
    return left, right
