"""SQL store: the truth about jobs and their results (SQLAlchemy 2)."""
