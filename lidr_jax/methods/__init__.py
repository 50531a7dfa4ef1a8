"""The research: LIDR and ICR pair construction, languages and language identification, prompt sets."""
