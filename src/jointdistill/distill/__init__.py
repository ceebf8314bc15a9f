"""JointDistill's parts: the connector, the feedback-driven teacher weights and the knowledge
trajectory. The `distill` stage that trains the student with them is built on these."""
