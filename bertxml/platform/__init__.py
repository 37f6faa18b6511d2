"""Spark and Delta Lake: the session and Delta's jars (`jars`, `warehouse.get_spark`), the `Warehouse` (read,
write, merge, register), table names and schemas (`tables`), the JVM-free Delta reader (`deltaread`), job runs
(`runs`), the SQL views (`views`), `sql` output formatting, the SQL endpoint (`sqlserver`) and fault injection
for tests (`faults`). It may import only the foundation (`bertxml.config`, `bertxml.config_io`,
`bertxml.metrics`) and itself; every other subpackage stands on it."""
