"""`fhir-rerank eval`: judge the real pipeline on topics + TREC qrels with ir-measures."""
