package bertxml.sqlserver;

import java.io.File;
import java.io.IOException;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

import org.apache.hadoop.fs.Path;
import org.apache.spark.SparkContext;
import org.apache.spark.api.python.PythonUtils;
import org.apache.spark.sql.SparkSessionExtensions;
import org.apache.spark.sql.catalyst.expressions.CallMethodViaReflection;
import org.apache.spark.sql.catalyst.expressions.Expression;
import org.apache.spark.sql.catalyst.plans.logical.LogicalPlan;
import org.apache.spark.sql.classic.SparkSession;
import org.apache.spark.sql.connector.catalog.Table;
import org.apache.spark.sql.execution.datasources.HadoopFsRelation;
import org.apache.spark.sql.execution.datasources.LogicalRelation;
import org.apache.spark.sql.execution.datasources.v2.DataSourceV2Relation;
import scala.Option;
import scala.runtime.BoxedUnit;

/**
 * The SQL endpoint's guard over the folders that hold note text (bertxml sql-server).
 *
 * A check rule run on every analysed plan of the server's sessions: a plan that reads any file under
 * one of the protected folders is refused, however the query names it (a catalog table, a
 * delta.`/path` or parquet.`/path` query, a table created over the folder with CREATE TABLE ...
 * LOCATION, its _delta_log, whose column statistics hold the first characters of the text).
 * Paths are compared after resolving symbolic links and "..", so a differently spelled path to the
 * same folder is refused too. The SQL functions reflect, java_method and try_reflect, which call
 * static Java methods in the server's JVM, are refused as well: they reach past any catalog.
 */
public final class PhiGuard implements scala.Function1<LogicalPlan, BoxedUnit> {
  private final List<String> protectedDirs = new ArrayList<>();

  public PhiGuard(List<String> dirs) {
    for (String dir : dirs) {
      protectedDirs.add(canonical(dir));
    }
  }

  /**
   * A new SparkSession on `sc` with its own shared state (so its own in-memory catalog), the
   * configured session extensions, this guard, and `options` as its initial settings (which every
   * session the Thrift server opens from it inherits).
   */
  public static SparkSession newGuardedSession(SparkContext sc, java.util.Map<String, String> options,
                                               List<String> dirs) {
    SparkSessionExtensions extensions = org.apache.spark.sql.classic.SparkSession$.MODULE$.applyAndLoadExtensions(sc);
    PhiGuard guard = new PhiGuard(dirs);
    extensions.injectCheckRule(session -> guard);
    return new SparkSession(sc, Option.empty(), Option.empty(), extensions,
        PythonUtils.toScalaMap(new HashMap<>(options)), PythonUtils.toScalaMap(new HashMap<String, String>()));
  }

  private static String canonical(String path) {
    String local = path.startsWith("file:") ? new Path(path).toUri().getPath() : path;
    try {
      return new File(local).getCanonicalPath();
    } catch (IOException e) {
      return new File(local).getAbsolutePath();
    }
  }

  private boolean isProtected(String path) {
    String candidate = canonical(path);
    for (String dir : protectedDirs) {
      if (candidate.equals(dir) || candidate.startsWith(dir + File.separator)) {
        return true;
      }
    }
    return false;
  }

  /** The folders or files a leaf of the plan reads; empty for leaves that read no files. */
  private static List<String> locations(LogicalPlan node) {
    List<String> out = new ArrayList<>();
    if (node instanceof LogicalRelation) {
      LogicalRelation rel = (LogicalRelation) node;
      if (rel.relation() instanceof HadoopFsRelation) {
        scala.collection.Iterator<Path> it = ((HadoopFsRelation) rel.relation()).location().rootPaths().iterator();
        while (it.hasNext()) {
          out.add(it.next().toString());
        }
      }
      if (rel.catalogTable().isDefined()) {
        Option<java.net.URI> uri = rel.catalogTable().get().storage().locationUri();
        if (uri.isDefined()) {
          out.add(uri.get().toString());
        }
      }
    } else if (node instanceof DataSourceV2Relation) {
      Table table = ((DataSourceV2Relation) node).table();
      String location = table.properties().get("location");
      if (location != null) {
        out.add(location);
      }
      out.add(table.name());
    }
    return out;
  }

  @Override
  public BoxedUnit apply(LogicalPlan plan) {
    plan.foreach(node -> {
      for (String location : locations(node)) {
        if (isProtected(location)) {
          throw new SecurityException("bertxml sql-server: note text is not served over this endpoint "
              + "(the query reads a table that holds note text; the operator can opt in with "
              + "sqlserver.allow_text)");
        }
      }
      scala.collection.Iterator<Expression> expressions = node.expressions().iterator();
      while (expressions.hasNext()) {
        if (expressions.next().find(e -> e instanceof CallMethodViaReflection).isDefined()) {
          throw new SecurityException("bertxml sql-server: reflect/java_method are not served over this endpoint");
        }
      }
      return BoxedUnit.UNIT;
    });
    return BoxedUnit.UNIT;
  }
}
