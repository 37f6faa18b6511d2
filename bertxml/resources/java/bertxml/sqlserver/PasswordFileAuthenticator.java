package bertxml.sqlserver;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.security.MessageDigest;
import java.security.spec.KeySpec;
import java.util.Base64;
import java.util.List;

import javax.crypto.SecretKeyFactory;
import javax.crypto.spec.PBEKeySpec;
import javax.security.sasl.AuthenticationException;

import org.apache.hive.service.auth.PasswdAuthenticationProvider;

/**
 * hive.server2.authentication=CUSTOM for bertxml sql-server: users and salted PBKDF2-SHA256 hashes
 * from a password file, one user a line:
 *
 *   USER:pbkdf2_sha256:ITERATIONS:SALT_BASE64:HASH_BASE64
 *
 * (written by `bertxml sql-server --hash-password USER`). The file's path is the JVM system property
 * bertxml.sqlserver.password_file; it is read on every login, so users can be added or removed
 * without a restart. Neither the password nor the reason a login failed is logged or returned.
 */
public final class PasswordFileAuthenticator implements PasswdAuthenticationProvider {
  public static final String PROPERTY = "bertxml.sqlserver.password_file";

  @Override
  public void Authenticate(String user, String password) throws AuthenticationException {
    if (user == null || password == null || !matches(user, password)) {
      throw new AuthenticationException("authentication failed");
    }
  }

  private static boolean matches(String user, String password) throws AuthenticationException {
    String file = System.getProperty(PROPERTY);
    if (file == null || file.isEmpty()) {
      throw new AuthenticationException("authentication failed: no password file configured");
    }
    List<String> lines;
    try {
      lines = Files.readAllLines(Paths.get(file), StandardCharsets.UTF_8);
    } catch (IOException e) {
      throw new AuthenticationException("authentication failed: the password file cannot be read");
    }
    for (String line : lines) {
      String[] f = line.trim().split(":");
      if (f.length != 5 || !f[0].equals(user) || !f[1].equals("pbkdf2_sha256")) {
        continue;
      }
      try {
        int iterations = Integer.parseInt(f[2]);
        byte[] salt = Base64.getDecoder().decode(f[3]);
        byte[] expected = Base64.getDecoder().decode(f[4]);
        KeySpec spec = new PBEKeySpec(password.toCharArray(), salt, iterations, expected.length * 8);
        byte[] actual = SecretKeyFactory.getInstance("PBKDF2WithHmacSHA256").generateSecret(spec).getEncoded();
        return MessageDigest.isEqual(expected, actual);
      } catch (Exception e) {
        return false;  // a malformed line admits no one
      }
    }
    return false;
  }
}
