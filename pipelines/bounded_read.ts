/** The bounded reader lives in data/ (the data readers use it too); kept here for pipelines' imports. */
export * from "../data/bounded_read.ts";
