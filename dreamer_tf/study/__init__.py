"""Tools around runs, not part of the agent: the benchmark launcher (`benchmark`), reading and
aggregating runs (`analysis`), figures (`plotting`), tables (`table`), the speed benchmark (`bench`)
and FLOP counts (`flops`). matplotlib and Ray are imported only when a tool is called."""
