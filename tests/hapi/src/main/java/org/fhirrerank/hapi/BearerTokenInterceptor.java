package org.fhirrerank.hapi;

import ca.uhn.fhir.interceptor.api.Hook;
import ca.uhn.fhir.interceptor.api.Interceptor;
import ca.uhn.fhir.interceptor.api.Pointcut;
import ca.uhn.fhir.rest.server.exceptions.AuthenticationException;
import ca.uhn.fhir.rest.server.exceptions.ForbiddenOperationException;
import jakarta.servlet.http.HttpServletRequest;

import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;

/**
 * While a token is set (at run time through {@link AdminServlet}, like the Node test server's
 * {@code /admin/auth}), every FHIR request but {@code GET /fhir/metadata} must carry exactly
 * {@code Authorization: <token>}: 401 with {@code WWW-Authenticate: Bearer} without it, 403 for
 * the {@code forbid} value.
 */
@Interceptor
public class BearerTokenInterceptor {

	private volatile String expected;
	private volatile String forbidden;

	public void configure(String token, String forbid) {
		expected = (token == null || token.isEmpty()) ? null : token;
		forbidden = (forbid == null || forbid.isEmpty()) ? null : forbid;
	}

	@Hook(Pointcut.SERVER_INCOMING_REQUEST_PRE_PROCESSED)
	public boolean check(HttpServletRequest request) {
		String want = expected;
		String deny = forbidden;
		if (want == null && deny == null) {
			return true;
		}
		String path = request.getPathInfo() == null ? "" : request.getPathInfo();
		if ("GET".equals(request.getMethod()) && path.equals("/metadata")) {
			return true;
		}
		String got = request.getHeader("Authorization");
		if (deny != null && same(got, deny)) {
			throw new ForbiddenOperationException("This token may not access this server");
		}
		if (want == null || same(got, want)) {
			return true;
		}
		AuthenticationException refused = new AuthenticationException(
				got == null ? "Missing bearer token" : "Invalid bearer token");
		refused.addResponseHeader("WWW-Authenticate", "Bearer realm=\"hapi-test-server\"");
		throw refused;
	}

	private static boolean same(String a, String b) {
		return a != null && MessageDigest.isEqual(a.getBytes(StandardCharsets.UTF_8), b.getBytes(StandardCharsets.UTF_8));
	}
}
