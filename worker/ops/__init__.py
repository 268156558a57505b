"""Operations: queue status, job listings and batch reprocessing."""
