"""The HTTP face (FastAPI): llama.cpp's server routes and the OpenAI routes over the shared engine."""
