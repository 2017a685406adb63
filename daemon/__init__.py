"""gpen-watch service: hot folders, readiness, the job table, publishing, the process."""
